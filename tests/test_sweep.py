"""`optim4rl sweep`: a grid of meta-training runs, resumable, evaluated, selected, re-evaluated."""

from __future__ import annotations

import json
import textwrap

import pytest

from optim4rl import sweep
from optim4rl.errors import ConfigError

TINY = textwrap.dedent("""
    description = "tiny"
    command = "meta-train"
    [meta]
    optimizer = "rlc2024"
    num_agents = 4
    reset_interval = 4
    iterations = 4
    inner_updates = 2
    rollout_length = 5
    iterations_per_chunk = 2
    eval_steps = 0
    meta_max_norm = 0
    meta_global_clip = 0.5
    [[meta.tasks]]
    env = "catch"
    learning_rate = 1e-3
""")


def test_parse_axis_single_and_paired():
    assert sweep.parse_axis("reset_interval=72,144") == (("reset_interval",), ((72,), (144,)))
    keys, values = sweep.parse_axis("meta_global_clip&meta_grad_clip=0.5&0,0&1.0")
    assert keys == ("meta_global_clip", "meta_grad_clip") and values == ((0.5, 0), (0, 1.0))
    with pytest.raises(ConfigError, match="needs 2 parts"):
        sweep.parse_axis("a&b=1,2&3")
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        sweep.parse_axis("reset_interval")


def test_a_bad_key_fails_before_any_training(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    spec = sweep.SweepSpec(preset=str(tmp_path / "tiny.toml"), grid=(sweep.parse_axis("no_such_key=1,2"),))
    with pytest.raises(ConfigError, match="no_such_key"):
        sweep.run(spec, tmp_path / "sw")
    assert not (tmp_path / "sw" / "points").exists()


def test_tiny_2x2_sweep_resumes_after_a_kill_and_selects_the_best(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY)
    regime = sweep.EvalRegime(env="catch", steps=2_000, num_envs=8, seeds=2, fresh_seeds=2, fresh_seed=100,
                              score_last_updates=5)
    grid = (sweep.parse_axis("reset_interval=2,4"), sweep.parse_axis("meta_learning_rate=1e-3,1e-2"))
    spec = sweep.SweepSpec(preset=str(tmp_path / "tiny.toml"), grid=grid, regime=regime, time_limit_s=1e-9)
    out = tmp_path / "sw"
    # "Killed" after one chunk of the first point: the time limit stops it at a chunk boundary.
    first = sweep.run(spec, out)
    assert [p["state"] for p in first["points"]] == ["partial", "new", "new", "new"]
    assert first["selection"] is None and not first["complete"]
    p0 = out / "points" / first["points"][0]["name"]
    assert json.loads((p0 / "summary.json").read_text())["stopped_at_iteration"] == 2
    # The rerun (no limit) continues the first point from its checkpoint and trains the rest.
    events = []
    done = sweep.run(sweep.SweepSpec(preset=spec.preset, grid=grid, regime=regime), out, callback=events.append)
    assert done["complete"] and [p["state"] for p in done["points"]] == ["done"] * 4
    assert [e["state"] for e in events if e.get("event") == "point"] == ["partial", "new", "new", "new"]
    rows = (p0 / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4  # resumed, not restarted: one row per meta-iteration
    # Selection = the best mean score on the selection seeds; re-evaluated on other seeds.
    means = {r["point"]: r["mean_score"] for r in done["ranking"]}
    assert len(means) == 4 and done["selection"]["point"] == max(means, key=means.get)
    selection = json.loads((out / "selection" / "summary.json").read_text())
    assert selection["spec"]["seed"] == 0 and selection["spec"]["seeds"] == 2
    assert selection["spec"]["score_last_updates"] == 5
    reeval = json.loads((out / "reevaluation" / "summary.json").read_text())
    assert reeval["spec"]["seed"] == 100 and done["reevaluation"]["seeds"] == [100, 101]
    assert done["reevaluation"]["row"] is not None and done["reevaluation"]["reference_row"]["optimizer"] == "adam"
    assert "re-evaluated on fresh seeds" in (out / "summary.md").read_text()
    # A third run trains nothing.
    events.clear()
    sweep.run(sweep.SweepSpec(preset=spec.preset, grid=grid, regime=regime), out, callback=events.append)
    assert {e["state"] for e in events if e.get("event") == "point"} == {"done"}
    assert not any(e.get("skipped") is False for e in events)
