"""optim4rl.analysis.stats against SciPy/NumPy references on fixed data; score plots."""

import dataclasses

import numpy as np
import pytest
import scipy.stats

from optim4rl.analysis import plots, stats

# Fixed per-seed scores (10 seeds, as in the paper's protocol), paired by position.
ADAM = np.array([412.0, 398.5, 430.2, 405.1, 391.7, 420.3, 415.8, 402.9, 399.4, 425.6])
BETTER = ADAM + np.array([25.1, 31.7, 18.2, 40.3, 22.8, 35.9, 27.4, 19.6, 33.0, 29.5])
SAME = ADAM + np.array([3.1, -4.2, 1.7, -2.5, 0.8, -1.1, 2.9, -3.6, 0.4, -0.9])


def test_score_from_curve_takes_mean_of_last_logged_returns():
    curve = np.arange(100.0)
    assert stats.score_from_curve(curve, 0.1) == pytest.approx(np.mean(np.arange(90.0, 100.0)))
    # NaN before the first finished episode is skipped; per seed along the last axis.
    with_nan = np.vstack([curve, np.r_[np.full(50, np.nan), np.arange(50.0)]])
    np.testing.assert_allclose(stats.score_from_curve(with_nan, 0.1), [94.5, 47.0])
    # Sparse evaluations (PPO eval_return): the last 10% of the *evaluations* (at least one).
    sparse = np.full(100, np.nan)
    sparse[[9, 49, 99]] = [1.0, 2.0, 3.0]
    assert stats.score_from_curve(sparse) == 3.0
    assert np.isnan(stats.score_from_curve(np.full(5, np.nan)))
    with pytest.raises(ValueError):
        stats.score_from_curve(curve, 0.0)


def test_mean_and_iqm_match_numpy_and_trim_mean():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 100.0])
    assert stats.mean(x) == pytest.approx(np.mean(x))
    assert stats.iqm(x) == pytest.approx(scipy.stats.trim_mean(x, 0.25))
    assert stats.iqm(x) == pytest.approx(4.5)  # middle 50%: 3, 4, 5, 6
    rows = np.vstack([x, x[::-1]])
    np.testing.assert_allclose(stats.iqm(rows, axis=-1), [4.5, 4.5])


@pytest.mark.parametrize("stat", [np.mean, stats.iqm, np.median])
def test_bootstrap_ci_matches_scipy_percentile_bootstrap(stat):
    ours = stats.bootstrap_ci(ADAM, stat, confidence=0.9, n_resamples=2000, seed=3)
    scipy_stat = {stats.iqm: lambda x, axis: scipy.stats.trim_mean(x, 0.25, axis=axis)}.get(
        stat, stat
    )
    ref = scipy.stats.bootstrap(
        (ADAM,), scipy_stat, confidence_level=0.9, n_resamples=2000, method="percentile",
        rng=np.random.default_rng(3),
    ).confidence_interval
    np.testing.assert_allclose(ours, (ref.low, ref.high), rtol=1e-9)
    # A different stream still agrees within Monte-Carlo error.
    other = stats.bootstrap_ci(ADAM, stat, confidence=0.9, n_resamples=10000, seed=11)
    np.testing.assert_allclose(other, (ref.low, ref.high), atol=2.0)


def test_bootstrap_ci_accepts_a_statistic_without_axis():
    ours = stats.bootstrap_ci(ADAM, lambda x: float(np.max(x) - np.min(x)), n_resamples=500)
    assert ours[0] <= ours[1]
    assert stats.bootstrap_ci([5.0]) == (5.0, 5.0)


def test_paired_test_matches_scipy():
    result = stats.paired_test(BETTER, ADAM, n_resamples=2000)
    t = scipy.stats.ttest_rel(BETTER, ADAM)
    w = scipy.stats.wilcoxon(BETTER - ADAM)
    assert result.n == 10
    assert result.mean_diff == pytest.approx(np.mean(BETTER - ADAM))
    assert result.t_statistic == pytest.approx(t.statistic)
    assert result.t_pvalue == pytest.approx(t.pvalue)
    assert result.wilcoxon_statistic == pytest.approx(w.statistic)
    assert result.wilcoxon_pvalue == pytest.approx(w.pvalue)
    assert result.ci_low < result.mean_diff < result.ci_high
    assert result.ci_low > 0


def test_paired_test_edge_cases():
    identical = stats.paired_test(ADAM, ADAM)
    assert identical.mean_diff == 0 and np.isnan(identical.wilcoxon_pvalue)
    with_nan = stats.paired_test(np.r_[BETTER[:9], np.nan], ADAM)
    assert with_nan.n == 9  # the pair with a diverged seed is dropped
    with pytest.raises(ValueError, match="equally many"):
        stats.paired_test(BETTER[:5], ADAM)


def test_welch_test_matches_scipy():
    result = stats.welch_test(BETTER[:7], ADAM, n_resamples=2000)
    t = scipy.stats.ttest_ind(BETTER[:7], ADAM, equal_var=False)
    assert (result.n, result.n_ref) == (7, 10)
    assert result.t_statistic == pytest.approx(t.statistic)
    assert result.t_pvalue == pytest.approx(t.pvalue)
    assert result.mean_diff == pytest.approx(BETTER[:7].mean() - ADAM.mean())
    assert result.ci_low < result.mean_diff < result.ci_high


def test_summarize_rows_and_verdicts():
    scores = {"adam": ADAM, "optim4rl": BETTER, "rmsprop": SAME, "lin": SAME - 30.0}
    rows = stats.summarize(scores, reference="adam", n_resamples=2000)
    by_name = {row.optimizer: row for row in rows}
    assert [row.optimizer for row in rows] == list(scores)
    assert by_name["adam"].verdict == "reference"
    assert by_name["optim4rl"].verdict == "better"
    assert by_name["rmsprop"].verdict == "tie"
    assert by_name["lin"].verdict == "worse"
    row = by_name["optim4rl"]
    assert row.n == 10
    assert row.mean == pytest.approx(BETTER.mean())
    assert row.iqm == pytest.approx(scipy.stats.trim_mean(BETTER, 0.25))
    assert row.ci_low < row.mean < row.ci_high
    assert row.pvalue == pytest.approx(scipy.stats.ttest_rel(BETTER, ADAM).pvalue)
    welch = stats.summarize(scores, paired=False, n_resamples=2000)
    assert welch[1].pvalue == pytest.approx(
        scipy.stats.ttest_ind(BETTER, ADAM, equal_var=False).pvalue
    )
    assert np.isnan(welch[1].wilcoxon_pvalue)
    with pytest.raises(ValueError, match="reference"):
        stats.summarize({"rmsprop": SAME}, reference="adam")


def test_markdown_table_contains_rows():
    rows = stats.summarize({"adam": ADAM, "optim4rl": BETTER}, n_resamples=500)
    table = stats.markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| optimizer |") and "p (t-test)" in lines[0]
    assert set(lines[1]) <= set("|-:")
    assert lines[2].startswith("| adam |") and "reference" in lines[2]
    assert lines[3].startswith("| optim4rl |") and "better" in lines[3]
    assert "—" in lines[2]  # NaN p-value of the reference row
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    picked = stats.markdown_table(rows, columns=["optimizer", "mean"])
    assert picked.splitlines()[2] == f"| adam | {ADAM.mean():.4g} |"
    dicts = stats.markdown_table([dataclasses.asdict(r) for r in rows], columns=["optimizer"])
    assert "| optim4rl |" in dicts


def test_aggregate_tasks_normalises_by_reference():
    scores_by_task = {
        "positive": {"adam": ADAM, "optim4rl": BETTER},
        "negative": {"adam": -ADAM, "optim4rl": -ADAM + 40.0},  # higher is still better
    }
    normalised = stats.normalize_scores(scores_by_task, "adam")
    for task in scores_by_task:
        assert normalised[task]["adam"].mean() == pytest.approx(1.0)
        assert normalised[task]["optim4rl"].mean() > 1.0
    np.testing.assert_allclose(normalised["positive"]["optim4rl"], BETTER / ADAM.mean())
    rows = stats.aggregate_tasks(scores_by_task, "adam", n_resamples=2000)
    adam, optim4rl = rows
    assert (adam.optimizer, adam.n_tasks, adam.n_runs) == ("adam", 2, 20)
    pooled = np.concatenate([normalised[t]["optim4rl"] for t in scores_by_task])
    assert optim4rl.iqm == pytest.approx(scipy.stats.trim_mean(pooled, 0.25))
    assert optim4rl.ci_low <= optim4rl.iqm <= optim4rl.ci_high
    assert optim4rl.ci_low > adam.ci_high
    zero = stats.normalize_scores({"t": {"adam": np.array([-1.0, 1.0]), "x": np.array([2.0, 4.0])}})
    assert np.all(np.isfinite(zero["t"]["x"]))  # zero reference mean falls back to the pooled std
    based = stats.normalize_scores({"t": {"adam": ADAM, "x": ADAM}}, baselines={"t": 0.0})
    np.testing.assert_allclose(based["t"]["x"], ADAM / ADAM.mean())


def test_curve_band_matches_a_loop_bootstrap():
    rng = np.random.default_rng(0)
    curves = rng.normal(size=(6, 40)).cumsum(axis=1)
    band = stats.curve_band(curves, confidence=0.9, n_resamples=4000, seed=1)
    np.testing.assert_allclose(band.mean, curves.mean(axis=0))
    assert np.all(band.low <= band.mean + 1e-12) and np.all(band.mean <= band.high + 1e-12)
    for t in (5, 39):  # pointwise it is the seed bootstrap of the mean
        low, high = stats.bootstrap_ci(curves[:, t], np.mean, 0.9, 4000, seed=7)
        assert band.low[t] == pytest.approx(low, abs=0.15 * (high - low) + 1e-9)
        assert band.high[t] == pytest.approx(high, abs=0.15 * (high - low) + 1e-9)
    curves[2, :10] = np.nan  # a seed that has not finished an episode yet
    band = stats.curve_band(curves)
    assert np.all(np.isfinite(band.mean)) and np.all(np.isfinite(band.low))
    single = stats.curve_band(curves[0])
    np.testing.assert_allclose(single.low, single.high)


def test_score_and_curve_plots_write_files(tmp_path):
    x = np.linspace(0, 1e5, 30)
    rng = np.random.default_rng(0)
    curves = {
        "adam": (x, rng.normal(size=(5, 30)).cumsum(axis=1)),
        "optim4rl": (np.tile(x, (5, 1)), rng.normal(size=(5, 30)).cumsum(axis=1) + 1.0),
        "one seed": (x, rng.normal(size=30)),
    }
    written = plots.plot_learning_curves(curves, tmp_path / "curves", title="Catch")
    assert [p.suffix for p in written] == [".png", ".svg"]
    assert all(p.stat().st_size > 1000 for p in written)
    scores = {"adam": ADAM, "optim4rl": BETTER, "rmsprop": SAME}
    (png,) = plots.plot_scores(scores, tmp_path / "scores.png", reference="adam")
    assert png.stat().st_size > 1000
    rows = stats.summarize(scores, n_resamples=500)
    (png,) = plots.plot_scores(rows, tmp_path / "rows.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_meta_training_plot_writes_file(tmp_path):
    rng = np.random.default_rng(0)
    tasks = ["small_dense_long", "big_dense_long"]
    rows = []
    for iteration in range(1, 41):
        row = {"iteration": float(iteration), "meta_loss": 1.0,
               "eval_return": float(iteration) if iteration % 20 == 0 else float("nan")}
        for task in tasks:
            row[f"meta_loss/{task}"] = rng.normal(1.0 / iteration, 0.1)
            row[f"meta_grad_norm/{task}"] = abs(rng.normal(1.0, 0.3))
            for age in range(4):  # young agents log a return first
                late = iteration > 5 * age
                row[f"return_age{age}/{task}"] = age + rng.normal() if late else float("nan")
        rows.append(row)
    (png,) = plots.plot_meta_training(rows, tasks, 4, tmp_path / "meta.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    with pytest.raises(ValueError):
        plots.plot_meta_training([], tasks, 4, tmp_path / "empty.png")
