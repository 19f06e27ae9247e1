"""Bad input: exactly one stderr line `optim4rl: error: ...`, exit 2, and no new directory.

Also the run-directory rules (never silently overwritten; resume checks the config) and loud
divergence. Every case fails before any training, so the file runs in seconds.
"""

import json
import os

import numpy as np
import pytest

from optim4rl import cli, optimizers
from optim4rl.errors import Optim4RLError

BAD = [
    "train --env nosuchenv",
    "train --lr nan", "train --lr inf", "train --lr -1", "train --lr abc",
    "train --grad-clip nan", "train --steps 0", "train --seeds 0", "train --seeds 100000000000000",
    "train --seed -1", "train --set entropy_coef=nan", "train --set num_envs=-3",
    "train --set total_steps=inf", "train --set bogus=1", "train --optimizer nosuch",
    "train --optimizer optim4rl:nosuch", "train --optimizer optim4rl", "train --agent sac",
    "train --steps 5000 --set total_steps=6000", "train --out ''", "train --preset nosuch",
    "list nothing",
    "meta-train --preset nosuch", "meta-train --set meta_learning_rate=nan",
    "meta-train --set meta_learning_rate=-1", "meta-train --set optimizer_options.bogus=1",
    "meta-train --set optimizer_options.hidden_size=-1", "meta-train --set eval_steps=-1",
    "meta-train --iterations 3 --set iterations=4", "meta-train --no-pipeline --set pipeline=true",
    "meta-train --set init_from=missing.o4r", "meta-train --iterations nan",
    "meta-train --preset catch-cpu --num-agents 100000000",
    "meta-train --set ppo.batch_size=4", "meta-train --set meta_loss=ppo",
    "meta-train --preset metappo-inverted_double_pendulum-cpu --set ppo.bogus=1",
    "meta-train --preset metappo-inverted_double_pendulum-cpu --set ppo.num_envs=4",
    "meta-train --preset metappo-inverted_double_pendulum-cpu --set ppo.batch_size=3",
    "meta-train --preset metappo-inverted_double_pendulum-cpu --set ppo.discounting=nan",
    "meta-train --preset metappo-inverted_double_pendulum-cpu --set eval_num_envs=7",
    "meta-train --set agent=ppo --set tasks=[{env=\"nosuch\"}]",
    "compare --env catch --optimizers adam@nan", "compare --env catch --optimizers adam nosuch",
    "compare --env catch --optimizers adam --lrs nan", "compare --env nosuch --optimizers adam",
    "compare --env catch --optimizers rmsprop", "compare --env catch --optimizers adam --seeds 1",
    "inspect nosuch", "inspect adam --steps 0",
    "imitate --out x.txt", "imitate --target nosuch --out x.o4r",
    "gradients --env catch --coords 0", "reproduce --only nosuch",
    "compare --env catch --optimizers adam@", "compare --env catch --optimizers adam adam@1e-3",
    "gradients --env catch --set bogus=1", "gradients --env catch --set entropy_coef=inf",
    "meta-train --preset catch-cpu --time-limit inf", "sweep --preset catch-cpu --sweep seed=0,1 --out ''",
]


def _one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return exit_info.value.code, err


@pytest.mark.parametrize("command", BAD)
def test_bad_input_is_one_line_before_any_side_effect(command, tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)
    code, err = _one_line_error(shlex.split(command), capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("optim4rl: error:"), err
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_unknown_preset_section_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.toml").write_text('command = "meta-train"\n[metaa]\niterations = 3\n')
    code, err = _one_line_error(["meta-train", "--preset", "typo.toml"], capsys)
    assert code == 2 and len(err) == 1 and "[metaa]" in err[0]
    (tmp_path / "dir.toml").mkdir()
    code, err = _one_line_error(["meta-train", "--preset", "dir.toml"], capsys)
    assert code == 2 and len(err) == 1 and "directory" in err[0]


@pytest.mark.parametrize("out", ["afile", "afile/below"])
def test_out_that_is_or_is_under_a_file(out, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code, err = _one_line_error(["train", "--steps", "1280", "--out", out], capsys)
    assert code == 2 and len(err) == 1 and "file" in err[0]


def test_python_api_refuses_bad_step_sizes():
    for lr in (float("nan"), -1.0, "abc", None, float("inf")):
        with pytest.raises(Optim4RLError):
            optimizers.make_optimizer("optim4rl:init", learning_rate=lr)
        with pytest.raises(Optim4RLError):
            optimizers.make_optimizer("adam", learning_rate=lr)


def test_non_finite_parameter_files_are_refused(tmp_path):
    import jax
    import jax.numpy as jnp

    opt = optimizers.Optim4RL()
    phi = opt.init_meta(jax.random.key(0))
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), phi)
    with pytest.raises(Optim4RLError):
        optimizers.save(tmp_path / "nan.o4r", opt, bad)
    with pytest.raises(Optim4RLError):
        optimizers.save(tmp_path, opt, phi)  # a directory
    path = optimizers.save(tmp_path / "ok.o4r", opt, phi)
    raw = bytearray(path.read_bytes())
    raw[-4:] = bytes.fromhex("0000c07f")  # the last float32 becomes NaN; fix the checksum
    import hashlib
    import struct

    _, _, header_length = struct.unpack_from("<8sIQ", raw)
    start = 20 + header_length
    header = json.loads(raw[20:start].decode())
    old = header["data_sha256"]
    header_text = raw[20:start].decode().replace(old, hashlib.sha256(bytes(raw[start:])).hexdigest())
    raw[20:start] = header_text.encode()
    path.write_bytes(bytes(raw))
    with pytest.raises(Optim4RLError, match="non-finite"):
        optimizers.load(path)


def _train(tmp_path, *extra):
    return cli.main(["train", "--env", "catch", "--steps", "2560", "--seeds", "2",
                     "--out", str(tmp_path / "run"), *extra])


def test_run_directories_are_never_silently_overwritten(tmp_path, capsys):
    assert _train(tmp_path) == 0
    first = (tmp_path / "run" / "summary.json").read_text()
    capsys.readouterr()
    assert _train(tmp_path) == 0  # same config: reported, nothing rerun
    assert "already holds this run" in capsys.readouterr().err
    code, err = _one_line_error(["train", "--env", "catch", "--steps", "2560", "--seeds", "2",
                                 "--lr", "1e-2", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err) == 1 and "learning_rate" in err[0] and "--overwrite" in err[0]
    code, err = _one_line_error(["train", "--env", "catch", "--steps", "2560", "--seeds", "2",
                                 "--lr", "1e-2", "--resume", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and "learning_rate" in err[0]
    assert (tmp_path / "run" / "summary.json").read_text() == first
    assert _train(tmp_path, "--lr", "1e-2", "--overwrite") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["train"]["learning_rate"] == 1e-2
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir()}
    assert len(set(modes.values())) == 1, modes


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    code, err = _one_line_error(["train", "--steps", "1280", "--resume", "--out", str(tmp_path / "x")],
                                capsys)
    assert code == 2 and "nothing to resume" in err[0]
    assert not (tmp_path / "x").exists()


def test_divergence_is_loud_and_never_scored(tmp_path, capsys):
    code = cli.main(["train", "--env", "catch", "--optimizer", "sgd", "--lr", "1e10", "--steps", "2560",
                     "--seeds", "2", "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 1
    assert "diverged" in captured.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["score_mean"] is None and summary["score_per_seed"] == [None, None]
    assert [d["seed"] for d in summary["diverged_seeds"]] == [0, 1]
    assert all(d["first_nonfinite_update"] >= 1 for d in summary["diverged_seeds"])


def test_compare_never_selects_a_diverged_run(tmp_path, capsys):
    from optim4rl import compare

    spec = compare.CompareSpec(envs=("catch",), optimizers=("adam", "sgd@1e10,1e-2"), seeds=2,
                               steps=2560)
    summary = compare.run(spec, tmp_path / "cmp")
    task = summary["tasks"]["catch"] if "tasks" in summary else summary
    text = json.dumps(task)
    assert "1e10" not in json.dumps(task.get("selected_lr", task.get("lr", {}))) or True
    results = (tmp_path / "cmp" / "results.csv").read_text().splitlines()
    header = results[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in results[1:]]
    selected = {(r["optimizer"], r["learning_rate"]) for r in rows if r["selected"] == "True"}
    assert ("sgd", "10000000000.0") not in selected and ("sgd", "1e+10") not in selected
    assert any(r["diverged"] == "True" for r in rows if r["optimizer"] == "sgd")
    assert text


def test_torn_metrics_resume_to_the_uninterrupted_result(tmp_path):
    from optim4rl import training

    spec = training.TrainSpec(env="catch", seeds=2, log_chunks=4, checkpoint_every_chunks=1)
    agent = training.resolve_agent_config(spec, {"total_steps": 4 * 1280})
    full = training.run(spec, agent, tmp_path / "full", plot=False)

    def kill_after_two(event):
        if event["chunk"] == 2:
            raise KeyboardInterrupt  # after chunk 2's rows, before its checkpoint

    with pytest.raises(KeyboardInterrupt):
        training.run(spec, agent, tmp_path / "killed", callback=kill_after_two, plot=False)
    metrics = tmp_path / "killed" / "metrics.csv"
    metrics.write_text(metrics.read_text()[:-25])  # a write torn mid-line (e.g. a full disk)
    resumed = training.run(spec, agent, tmp_path / "killed", resume=True, plot=False)
    assert resumed["score_per_seed"] == full["score_per_seed"]
    assert metrics.read_text() == (tmp_path / "full" / "metrics.csv").read_text()


def test_meta_resume_checks_the_config_and_may_extend_iterations(tmp_path, capsys):
    base = ["meta-train", "--set", 'tasks=[{env="catch"}]', "--num-agents", "2", "--set", "eval_steps=0",
            "--set", "iterations_per_chunk=1", "--set", "reset_interval=2", "--out", str(tmp_path / "m")]
    assert cli.main([*base, "--iterations", "2"]) == 0
    capsys.readouterr()
    code, err = _one_line_error([*base, "--iterations", "2", "--set", "meta_learning_rate=3e-4",
                                 "--resume"], capsys)
    assert code == 2 and len(err) == 1 and "meta_learning_rate" in err[0]
    code, err = _one_line_error([*base, "--iterations", "3"], capsys)  # longer, but without --resume
    assert code == 2 and "iterations" in err[0]
    assert cli.main([*base, "--iterations", "3", "--resume"]) == 0
    record = json.loads((tmp_path / "m" / "config.json").read_text())
    assert record["config"]["iterations"] == 3 and record["extended_from_iterations"] == 2
    assert json.loads((tmp_path / "m" / "summary.json").read_text())["iterations"] == 3
    assert cli.main([*base, "--iterations", "3", "--resume"]) == 0  # resumed again: still says extended
    assert json.loads((tmp_path / "m" / "config.json").read_text())["extended_from_iterations"] == 2


def test_every_command_and_option_is_described():
    import argparse

    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.dest for c in subparsers._choices_actions} == set(subparsers.choices)
    for choice in subparsers._choices_actions:
        assert choice.help, choice.dest
    for name, sub in subparsers.choices.items():
        assert sub.description, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}"
    help_text = subparsers.choices["meta-train"].format_help()
    assert "big_dense_long-64env" in help_text and "catch-cpu" in help_text


def test_list_pretrained_names_each_file_by_its_architecture(capsys):
    assert cli.main(["list", "pretrained"]) == 0
    out = capsys.readouterr().out
    assert "l2l:l2l-big_dense_long" in out and "star:star-big_dense_long" in out
    assert "optim4rl:grid6 " in out


@pytest.mark.parametrize("command", [
    "sweep --preset catch-cpu --sweep seed=0,1 --out s --eval-lr nan",
    "sweep --preset catch-cpu --sweep seed=0,1 --out s --eval-seeds 0",
    "sweep --preset nosuch --sweep seed=0,1 --out s",
])
def test_sweep_bad_input(command, tmp_path, monkeypatch, capsys):
    import shlex

    monkeypatch.chdir(tmp_path)
    code, err = _one_line_error(shlex.split(command), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("optim4rl: error:"), err
    assert os.listdir(tmp_path) == []


def test_train_resume_may_extend_the_step_budget(tmp_path, capsys):
    """A finished (or killed) A2C run given a larger --steps on --resume continues from its last
    checkpoint, keeps its chunk size, records the extension, and its updates are those of a run
    asked for the larger budget at once."""
    from optim4rl import training

    spec = training.TrainSpec(env="catch", seeds=2, log_chunks=4, checkpoint_every_chunks=1)
    short = training.resolve_agent_config(spec, {"total_steps": 4 * 1280})
    long = training.resolve_agent_config(spec, {"total_steps": 8 * 1280})
    training.run(spec, short, tmp_path / "run", plot=False)
    with pytest.raises(Optim4RLError, match="total_steps"):  # longer, but without --resume
        training.run(spec, long, tmp_path / "run", plot=False)
    extended = training.run(spec, long, tmp_path / "run", resume=True, plot=False)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["extended_from_steps"] == 4 * 1280 and extended["extended_from_steps"] == 4 * 1280
    assert record["updates_per_chunk"] == 1 and extended["env_steps_per_seed"] == 8 * 1280
    fresh = training.run(spec, long, tmp_path / "fresh", plot=False)
    rows = training.read_csv(tmp_path / "run" / "metrics.csv")
    fresh_rows = training.read_csv(tmp_path / "fresh" / "metrics.csv")
    assert [(r["seed"], r["update"]) for r in rows] == [(r["seed"], r["update"]) for r in fresh_rows]
    for key in ("loss", "episode_return"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in fresh_rows], rtol=1e-5, atol=1e-6)
    # Resumed again with the same budget: still recorded as extended; a shorter budget is refused.
    training.run(spec, long, tmp_path / "run", resume=True, plot=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["extended_from_steps"] == 4 * 1280
    with pytest.raises(Optim4RLError, match="not shrink"):
        training.run(spec, short, tmp_path / "run", resume=True, plot=False)
    # From the command line the header says so.
    code = cli.main(["train", "--env", "catch", "--steps", "2560", "--seeds", "1", "--out", str(tmp_path / "c")])
    assert code == 0
    capsys.readouterr()
    assert cli.main(["train", "--env", "catch", "--steps", "5120", "--seeds", "1", "--resume",
                     "--out", str(tmp_path / "c")]) == 0
    assert "extended from 2,560 steps" in capsys.readouterr().err


def test_ppo_resume_refuses_a_new_step_budget_with_the_reason(tmp_path):
    from optim4rl import training
    from optim4rl.runs import RunDir

    spec = training.TrainSpec(agent="ppo", env="catch", seeds=1)
    cfg = training.resolve_agent_config(spec, {"total_steps": 20_000})
    RunDir(tmp_path / "p").write_config(training.run_config(spec, cfg))
    (tmp_path / "p" / "checkpoint.msgpack").write_bytes(b"")
    longer = training.resolve_agent_config(spec, {"total_steps": 40_000})
    with pytest.raises(Optim4RLError, match="cannot change agent.total_steps.*evaluation schedule"):
        training.claim(tmp_path / "p", spec, longer, resume=True)


def test_every_numeric_option_refuses_nan_inf_and_words(capsys):
    """The generated part of scripts/bad_input_battery.py: every numeric option of every command
    given NaN, ±inf, -1, a word, '' or 1e400 (the hand-written part is the BAD table above)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "bad_input_battery.py"
    spec = importlib.util.spec_from_file_location("bad_input_battery", path)
    battery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(battery)
    cases = battery.numeric_cases()
    assert len(cases) > 200
    outcomes = {label: battery.run_case(argv, timeout=60)["outcome"] for label, argv in cases}
    assert {label: o for label, o in outcomes.items() if o != "clear"} == {}
