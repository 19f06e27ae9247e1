"""Evaluation in the final paper version's regime: 512 envs, score = mean return of the last 20 updates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from optim4rl import compare, reproduce
from optim4rl.errors import ConfigError
from optim4rl.runs import read_csv


def test_score_last_updates_is_the_mean_of_each_seeds_last_updates_and_partial_reports(tmp_path):
    spec = compare.CompareSpec(envs=("catch",), optimizers=("adam", "sgd"), seeds=2, steps=3_000,
                               agent_overrides={"num_envs": 8}, score_last_updates=5)
    out = tmp_path / "cmp"
    # Only Adam trained so far: the partial report leaves sgd out and says so.
    compare.run(compare.CompareSpec(**{**spec.__dict__, "optimizers": ("adam",)}), out)
    partial = compare.run(spec, out, only_finished=True)
    assert partial["unfinished"] == ["catch: sgd lr 0.003"]
    assert [r["optimizer"] for r in partial["tasks"]["catch"]["rows"]] == ["adam"]
    assert "Not finished yet" in (out / "summary.md").read_text()
    assert not (out / "runs" / "catch" / "sgd").exists()  # nothing trained
    # The score: mean episode return of each seed's last 5 updates, from metrics.csv.
    rows = read_csv(out / "runs" / "catch" / "adam" / "lr0.003" / "metrics.csv")
    results = read_csv(out / "results.csv")
    for seed in (0, 1):
        returns = [r["episode_return"] for r in sorted((r for r in rows if r["seed"] == seed),
                                                      key=lambda r: r["update"])][-5:]
        got = next(r["score"] for r in results if r["seed"] == seed)
        assert got == pytest.approx(np.nanmean(returns))
    assert partial["score"] == "mean episode return of the last 5 updates"
    assert "Score = mean episode return of the last 5 updates" in (out / "summary.md").read_text()
    full = compare.run(spec, out)
    assert "unfinished" not in full and len(full["tasks"]["catch"]["rows"]) == 2
    with pytest.raises(ConfigError, match="positive number of updates"):
        compare.CompareSpec(envs=("catch",), optimizers=("adam",), score_last_updates=0)


def test_paper_regime_experiment_is_the_papers_evaluation():
    cpu, paper = reproduce.paper_regime("cpu"), reproduce.paper_regime("paper")
    for exp in (cpu, paper):
        assert exp.overrides == {"num_envs": 512} and exp.score_last_updates == 20
        assert exp.envs == ("big_dense_long",) and exp.agent == "a2c"
        assert "rlc2024:init@3e-3" in exp.optimizers and any(o.startswith("sign_sgd@") for o in exp.optimizers)
    assert cpu.steps == 10_000_000 and cpu.seeds == 3
    assert paper.steps is None and paper.seeds == 10  # the paper scale's 3e7 steps
    assert "adam@3e-2,1e-2,3e-3,1e-3,3e-4,1e-4" in paper.optimizers
    assert "g_paper_regime" in {e.name for e in reproduce.experiments("cpu")}
