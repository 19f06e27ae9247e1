"""scripts/ship_pretrained.py: re-evaluating a shipped optimizer keeps its history."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ship_pretrained.py"


@pytest.fixture()
def ship(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("ship_pretrained", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "PRETRAINED_DIR", tmp_path / "pretrained")
    (tmp_path / "pretrained").mkdir()
    return module


def _compare_dir(path: Path, label: str, mean: float) -> Path:
    path.mkdir()
    row = {"optimizer": label, "n": 5, "mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1,
           "pvalue": 0.01, "verdict": "worse"}
    (path / "summary.json").write_text(json.dumps({"tasks": {"big_dense_long": {"rows": [row]}}}))
    (path / "config.json").write_text(json.dumps({"config": {"seeds": 5}}))
    return path


def test_reevaluate_replaces_the_evaluation_and_keeps_the_old_one(ship, tmp_path):
    record = ship.PRETRAINED_DIR / "big_dense_long.json"
    record.write_text(json.dumps({"name": "big_dense_long", "evaluation": {"old": True}}))
    ship.reevaluate("big_dense_long", _compare_dir(tmp_path / "cmp", "optim4rl:big_dense_long", 0.09))
    data = json.loads(record.read_text())
    assert data["earlier_evaluations"] == [{"old": True}]
    assert data["evaluation"]["tasks"]["big_dense_long"]["rows"][0]["mean"] == 0.09


def test_reevaluate_refuses_a_comparison_of_other_optimizers(ship, tmp_path):
    (ship.PRETRAINED_DIR / "grid6.json").write_text(json.dumps({"name": "grid6"}))
    with pytest.raises(SystemExit, match="did not evaluate 'grid6'"):
        ship.reevaluate("grid6", _compare_dir(tmp_path / "cmp", "optim4rl:big_dense_long", 0.09))
    with pytest.raises(SystemExit, match="no shipped optimizer"):
        ship.reevaluate("nope", tmp_path / "cmp")


def test_ship_a_run_without_config_json_reads_the_files_provenance(ship, tmp_path):
    import jax

    from optim4rl import optimizers
    from optim4rl.optimizers import Optim4RL

    run = tmp_path / "remote-run"
    run.mkdir()
    opt = Optim4RL()
    info = {"command": "python -m optim4rl meta-train --preset big_dense_long", "preset": "big_dense_long",
            "config": {"num_agents": 512, "tasks": [{"env": "big_dense_long"}]}, "pipeline": True}
    optimizers.save(run / "optimizer.o4r", opt, opt.init_meta(jax.random.key(0)), info=info)
    (run / "summary.json").write_text(json.dumps({"iterations": 585, "env_steps": 29_952_000}))
    ship.ship(run, "bdl-gpu", None, None, note="made on a GPU machine")
    record = json.loads((ship.PRETRAINED_DIR / "bdl-gpu.json").read_text())
    assert record["produced_by"]["commands"] == [info["command"]]
    assert record["note"] == "made on a GPU machine"
    assert record["scale"].startswith("big_dense_long: 512 agents per task, 585 meta-iterations")
    assert (ship.PRETRAINED_DIR / "bdl-gpu.o4r").is_file()


def test_ship_records_the_command_of_the_file_the_run_started_from(ship, tmp_path):
    import hashlib

    import jax

    from optim4rl import optimizers
    from optim4rl.optimizers import Optim4RL

    opt = Optim4RL()
    phi = opt.init_meta(jax.random.key(0))
    start = tmp_path / "imitation.o4r"
    optimizers.save(start, opt, phi, info={"command": "optim4rl imitate --target rmsprop --out imitation.o4r"})
    run = tmp_path / "run"
    run.mkdir()
    digest = hashlib.sha256(start.read_bytes()).hexdigest()
    info = {"command": "optim4rl meta-train --preset big_dense_long-64env --set init_from=imitation.o4r",
            "config": {"num_agents": 16, "tasks": [{"env": "big_dense_long"}]},
            "init_from": {"path": str(start), "sha256": digest}}
    optimizers.save(run / "optimizer.o4r", opt, phi, info=info)
    (run / "summary.json").write_text(json.dumps({"iterations": 200, "env_steps": 20_480_000}))
    ship.ship(run, "chained", None, None)
    record = json.loads((ship.PRETRAINED_DIR / "chained.json").read_text())
    assert record["produced_by"]["commands"] == [
        "optim4rl imitate --target rmsprop --out imitation.o4r", info["command"]]
    # A start file replaced since the run read it cannot vouch for the shipped file.
    optimizers.save(start, opt, phi, info={"command": "something else"})
    with pytest.raises(SystemExit, match="changed since the run started"):
        ship.ship(run, "chained", None, None)


def test_reevaluate_accepts_a_comparison_that_named_the_same_file_by_path(ship, tmp_path):
    # `optim4rl sweep` evaluates a grid point's optimizer.o4r by path, under the point's name.
    import shutil

    from optim4rl.optimizers.registry import pretrained_path

    point = tmp_path / "p00"
    point.mkdir()
    shutil.copyfile(pretrained_path("catch"), point / "optimizer.o4r")
    shutil.copyfile(pretrained_path("catch"), ship.PRETRAINED_DIR / "catch.o4r")
    (ship.PRETRAINED_DIR / "catch.json").write_text(json.dumps({"name": "catch"}))
    cmp = _compare_dir(tmp_path / "cmp", "optim4rl:p00", 0.5)
    config = {"config": {"seeds": 3, "optimizers": ["adam@0.003", f"optim4rl:{point / 'optimizer.o4r'}@0.003"]}}
    (cmp / "config.json").write_text(json.dumps(config))
    ship.reevaluate("catch", cmp)
    assert json.loads((ship.PRETRAINED_DIR / "catch.json").read_text())["evaluation"]["tasks"]
    # Other bytes under the same path name are not the shipped file.
    shutil.copyfile(pretrained_path("grid6"), point / "optimizer.o4r")
    with pytest.raises(SystemExit, match="did not evaluate 'catch'"):
        ship.reevaluate("catch", cmp)
