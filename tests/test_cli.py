"""The `optim4rl` command end to end: train, compare, list, and its one-line errors."""

from __future__ import annotations

import csv
import json

import pytest

from optim4rl.cli import main
from optim4rl.errors import ConfigError


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code, captured = run_cli(["train", "--env", "catch", "--agent", "a2c", "--optimizer", "adam",
                              "--steps", "20000", "--seeds", "2", "--out", str(out)], capsys)
    assert code == 0
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "summary.json", "learning_curve.png",
                 "checkpoint.msgpack"):
        assert (out / name).exists(), name
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"seed", "env_steps", "episode_return"} <= set(rows[0])
    assert {r["seed"] for r in rows} == {"0", "1"}
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["score_per_seed"]) == 2 and summary["steps_per_s"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["train"]["optimizer"] == "adam"
    assert config["config"]["agent"]["total_steps"] == 20000
    assert "package" in config["code_version"]
    assert "mean score" in captured.out
    # Resuming a finished run changes nothing.
    code, _ = run_cli(["train", "--env", "catch", "--agent", "a2c", "--optimizer", "adam", "--steps", "20000",
                       "--seeds", "2", "--out", str(out), "--resume"], capsys)
    assert code == 0
    assert json.loads((out / "summary.json").read_text())["score_per_seed"] == summary["score_per_seed"]


@pytest.mark.parametrize("args,message", [
    (["train", "--env", "nosuchenv"], "unknown env 'nosuchenv'"),
    (["train", "--env", "catch", "--optimizer", "adamx"], "adamx"),
    (["train", "--env", "catch", "--set", "num_envz=3"], "num_envz"),
    (["train", "--env", "catch", "--preset", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    (["meta-train", "--preset", "catch-cpu", "--set", "reset_intervall=3"], "reset_intervall"),
    (["compare", "--env", "catch", "--optimizers", "sgd", "rmsprop"], "reference optimizer 'adam'"),
])
def test_bad_input_gives_one_clear_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("optim4rl: error: ")
    assert message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_corrupt_optimizer_file_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.o4r"
    bad.write_bytes(b"not an optimizer")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--env", "catch", "--optimizer", f"optim4rl:{bad}", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "bad.o4r" in capsys.readouterr().err


def test_list(capsys):
    code, captured = run_cli(["list"], capsys)
    assert code == 0
    for word in ("catch", "big_dense_long", "adam", "optim4rl", "grid6-cpu"):
        assert word in captured.out


def test_compare_two_optimizers_and_rerun_skips(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--env", "catch", "--optimizers", "adam", "rmsprop@1e-3,3e-3", "--seeds", "3",
            "--steps", "15000", "--out", str(out)]
    code, captured = run_cli(args, capsys)
    assert code == 0
    assert "(training)" in captured.err
    for name in ("results.csv", "summary.md", "summary.json", "curves_catch.png", "curves_catch.svg",
                 "scores_catch.png", "scores_catch.svg"):
        assert (out / name).exists(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3  # (adam + rmsprop at two step sizes) x 3 seeds
    summary = json.loads((out / "summary.json").read_text())
    table = {r["optimizer"]: r for r in summary["tasks"]["catch"]["rows"]}
    assert table["adam"]["verdict"] == "reference"
    selected = [r for r in rows if r["optimizer"] == "rmsprop" and r["selected"] == "True"]
    assert len(selected) == 3
    mean_selected = sum(float(r["score"]) for r in selected) / 3
    assert table["rmsprop"]["mean"] == pytest.approx(mean_selected, rel=1e-6)
    assert "| rmsprop" in (out / "summary.md").read_text()
    # Every run's code version is listed, so reused runs from older code cannot hide.
    assert sum(summary["code_versions"].values()) == 3
    assert "Code versions of the runs:" in (out / "summary.md").read_text()
    code, captured = run_cli(args, capsys)
    assert code == 0
    assert "(training)" not in captured.err and captured.err.count("skipped") == 3


def test_reproduce_smoke(tmp_path, capsys):
    out = tmp_path / "repro"
    docs = tmp_path / "docs" / "results.md"
    code, captured = run_cli(["reproduce", "--budget", "smoke", "--out", str(out), "--docs", str(docs)], capsys)
    assert code == 0
    report = (out / "results.md").read_text()
    assert "Where the learned optimizers win, tie and lose (against Adam unless named)" in report
    assert "## catch" in report and "## CartPole-v1" in report
    assert "Code versions of the runs read: `" in report
    for exp in ("a_big_dense_long", "c_gymnax"):
        assert (out / exp / "summary.json").exists()
    text = docs.read_text()
    assert "figures/results/a_big_dense_long/curves_catch.png" in text
    assert (docs.parent / "figures" / "results" / "a_big_dense_long" / "curves_catch.png").exists()


def test_reproduce_budgets_cover_the_papers_brax_tasks():
    from optim4rl import reproduce

    paper = {e.name: e for e in reproduce.experiments("paper")}
    assert set(paper["b_brax"].envs) == {"inverted_double_pendulum", "reacher", "ant", "humanoid", "walker2d"}
    assert "b_brax_reacher" not in paper
    cpu = {e.name: e for e in reproduce.experiments("cpu")}
    assert cpu["b_brax_reacher"].envs == ("reacher",) and cpu["b_brax_reacher"].agent == "ppo"
    assert cpu["b_brax_ant"].envs == ("ant",) and "b_brax_ant" not in paper
    for env in ("humanoid", "walker2d"):  # in b_brax at the paper budget, on their own at the cpu one
        assert cpu[f"b_brax_{env}"].envs == (env,) and env in paper["b_brax"].envs
    assert cpu["b_brax"].envs == ("inverted_double_pendulum",)
    with pytest.raises(ConfigError, match="unknown budget"):
        reproduce.experiments("gpu")


def test_reproduce_catch_experiments_and_a_non_adam_reference_in_the_report(tmp_path):
    import json

    from optim4rl import reproduce

    cpu = {e.name: e for e in reproduce.experiments("cpu")}
    assert cpu["e_catch"].envs == ("catch",) and cpu["e_catch"].reference == "adam"
    assert cpu["e_catch_vs_init"].reference == "optim4rl:init"
    assert cpu["e_catch_vs_init"].optimizers == cpu["e_catch"].optimizers  # the same runs, trained once
    assert all(o.endswith("@1e-3") for o in cpu["e_catch_lr1e-3"].optimizers)
    # The report names the reference of each verdict.
    exp = cpu["e_catch_vs_init"]
    (tmp_path / exp.name).mkdir()
    row = {"optimizer": "optim4rl:catch", "verdict": "better", "diff": 0.5, "diff_ci_low": 0.25,
           "diff_ci_high": 0.75, "pvalue": 0.01, "n": 10}
    (tmp_path / exp.name / "summary.json").write_text(json.dumps({"tasks": {"catch": {"rows": [row]}}}))
    (tmp_path / exp.name / "summary.md").write_text("# title\n\n| table |\n")
    report = reproduce.write_report(tmp_path, "smoke", [exp]).read_text()
    assert "`optim4rl:catch` vs `optim4rl:init`: **better** (mean difference 0.5" in report


def test_reproduce_long_lifetime_experiment_matches_its_meta_training(monkeypatch):
    from optim4rl import config as config_lib
    from optim4rl import reproduce
    from optim4rl.meta import train as meta_train

    cpu = {e.name: e for e in reproduce.experiments("cpu")}
    exp = cpu["f_big_dense_long_64env"]
    meta = meta_train.load_config(dict(config_lib.load_preset("big_dense_long-64env")["meta"]))
    # The test horizon is the meta-training agents' lifetime, with as many envs.
    assert exp.overrides["num_envs"] == meta.envs_per_agent
    assert exp.steps <= meta.envs_per_agent * meta.rollout_length * meta.reset_interval * meta.inner_updates
    assert "optim4rl:big_dense_long-64env-actor@1e-3,3e-3,1e-2" in exp.optimizers and exp.seeds == 10
    assert "adam@1e-3,3e-3,1e-2" in exp.optimizers  # both swept: "at the best step size" (issue #4)
    # Same task and optimizers as a_big_dense_long with other seeds: its runs must not share a directory.
    shared = {(e.runs, env, o.split("@")[0]) for e in cpu.values() if e.name != exp.name
              for env in e.envs for o in e.optimizers}
    assert not any((exp.runs, env, o.split("@")[0]) in shared for env in exp.envs for o in exp.optimizers)
    # Without such a shipped file the experiment is left out, not run with the untrained φ twice.
    monkeypatch.setattr(reproduce, "list_pretrained", lambda: ["catch"])
    assert "f_big_dense_long_64env" not in {e.name for e in reproduce.experiments("cpu")}


def test_default_step_sizes_follow_spec_per_task(tmp_path, monkeypatch):
    from optim4rl import compare, training

    assert training.default_learning_rate("a2c", "big_dense_long") == 3e-3
    assert training.default_learning_rate("ppo", "walker2d") == 3e-5  # docs/paper_settings.md §4's walker2d row
    assert training.default_learning_rate("ppo", "brax:ant") == 3e-4
    assert training.default_learning_rate("ppo", "CartPole-v1") == 3e-4
    # compare: an optimizer without "@LR" gets each task's own default, one run per task.
    seen = []

    def fake_run(train_spec, agent_cfg, run_dir, **kwargs):
        seen.append((train_spec.env, train_spec.learning_rate))
        raise RuntimeError("stop")

    monkeypatch.setattr(training, "run", fake_run)
    spec = compare.CompareSpec(envs=("walker2d",), optimizers=("adam",), agent="ppo", seeds=2)
    with pytest.raises(RuntimeError, match="stop"):
        compare.run(spec, tmp_path / "cmp")
    assert seen == [("walker2d", 3e-5)]


def test_reproduce_metappo_experiments_match_the_meta_training_agents(monkeypatch):
    from optim4rl import config as config_lib
    from optim4rl import reproduce
    from optim4rl.meta import train as meta_train

    monkeypatch.setattr(reproduce, "list_pretrained", lambda: list(reproduce.METAPPO_FILES))
    cpu = {e.name: e for e in reproduce.experiments("cpu")}
    meta = meta_train.load_config(dict(config_lib.load_preset("metappo-inverted_double_pendulum-cpu")["meta"]))
    for name in ("i_metappo", "i_metappo_vs_init", "i_metappo_reacher"):
        exp = cpu[name]
        assert exp.agent == "ppo" and exp.seeds == 5 and exp.runs == "runs-i_metappo"
        # Agents of the meta-training's shape, the files at its step size.
        assert exp.overrides["num_envs"] == meta.envs_per_agent
        for key in ("batch_size", "num_minibatches", "unroll_length", "num_updates_per_batch"):
            assert exp.overrides[key] == meta.ppo[key], key
        assert tuple(exp.overrides["policy_hidden_sizes"]) == tuple(meta.ppo["policy_hidden_sizes"])
        assert tuple(exp.overrides["value_hidden_sizes"]) == tuple(meta.ppo["value_hidden_sizes"])
        assert {f"optim4rl:{n}@3e-4" for n in reproduce.METAPPO_FILES} <= set(exp.optimizers)
        assert meta.tasks[0].learning_rate == 3e-4 and "optim4rl:init@3e-4" in exp.optimizers
    assert cpu["i_metappo"].envs == (meta.tasks[0].env,)
    assert cpu["i_metappo_reacher"].envs == ("reacher",) and "reacher" != meta.tasks[0].env  # unseen
    assert cpu["i_metappo_vs_init"].reference == "optim4rl:init"
    assert cpu["i_metappo_vs_init"].optimizers == cpu["i_metappo"].optimizers  # the same runs, trained once
    assert {e.name for e in reproduce.experiments("paper")} >= {"i_metappo", "i_metappo_reacher"}
    assert not any(e.name.startswith("i_metappo") for e in reproduce.experiments("smoke"))
    # Without the shipped files the experiments are left out.
    monkeypatch.setattr(reproduce, "list_pretrained", lambda: ["catch"])
    assert not any(e.name.startswith("i_metappo") for e in reproduce.experiments("cpu"))
