"""Statistics for comparing optimizers across seeds and tasks (docs/paper_settings.md §5.5, `optim4rl compare`).

Scores follow the paper: one score per seed, the mean of the last logged returns. Intervals are
percentile-bootstrap intervals (90% by default, as in the paper); significance against a reference
optimizer (Adam by default) uses paired tests when the seeds are paired and Welch's t-test when they
are not. Aggregates over tasks use the interquartile mean (IQM) with a stratified bootstrap, as
recommended by Agarwal et al. 2021 ("Deep RL at the edge of the statistical precipice", rliable).

Higher scores are better (episode returns). Everything here is plain NumPy/SciPy on the host.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.stats

__all__ = [
    "AggregateRow",
    "CurveBand",
    "PairedTest",
    "SummaryRow",
    "WelchTest",
    "aggregate_tasks",
    "bootstrap_ci",
    "curve_band",
    "iqm",
    "markdown_table",
    "mean",
    "normalize_scores",
    "paired_test",
    "score_from_curve",
    "summarize",
    "welch_test",
]

Statistic = Callable[..., Any]


# --------------------------------------------------------------------------------------------
# Scores and point statistics
# --------------------------------------------------------------------------------------------


def score_from_curve(returns: Any, last_fraction: float = 0.1) -> float | np.ndarray:
    """Score of a learning curve: the mean of its last logged returns.

    `returns` is `[T]` (one run) or `[..., T]` (e.g. `[seeds, T]`). NaN marks "nothing logged"
    (before the first episode ends, or between PPO evaluations), so per run the score is the mean of
    the last `max(1, ceil(last_fraction * n_logged))` finite values, where `n_logged` counts the
    finite entries. For dense curves this is simply the last `last_fraction` of the curve; for
    sparse evaluation curves it is the last `last_fraction` of the evaluations. A run with nothing
    logged scores NaN.

    Returns a float for a 1-D curve, else an array of the leading shape.
    """
    if not 0.0 < last_fraction <= 1.0:
        raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}")
    curves = np.asarray(returns, dtype=np.float64)
    if curves.ndim == 0 or curves.shape[-1] == 0:
        raise ValueError("score_from_curve needs a curve with at least one entry on its last axis")
    flat = curves.reshape(-1, curves.shape[-1])
    scores = np.full(flat.shape[0], np.nan)
    for i, row in enumerate(flat):
        logged = row[np.isfinite(row)]
        if logged.size:
            keep = max(1, math.ceil(last_fraction * logged.size))
            scores[i] = logged[-keep:].mean()
    if curves.ndim == 1:
        return float(scores[0])
    return scores.reshape(curves.shape[:-1])


def _as_1d(x: Any, name: str = "x") -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def mean(x: Any) -> float:
    """Arithmetic mean of a 1-D sample (NaN propagates: a diverged seed is not silently dropped)."""
    return float(np.mean(_as_1d(x)))


def iqm(x: Any, axis: int | None = None) -> Any:
    """Interquartile mean: the mean of the middle 50% (`scipy.stats.trim_mean(x, 0.25)`, rliable).

    With `axis=None` the sample is flattened and a float is returned; else reduces along `axis`.
    """
    if axis is None:
        return float(scipy.stats.trim_mean(_as_1d(x), 0.25))
    return scipy.stats.trim_mean(np.asarray(x, dtype=np.float64), 0.25, axis=axis)


def _apply_stat(stat: Statistic, samples: np.ndarray) -> np.ndarray:
    """`stat` over the last axis of `samples`, vectorised when `stat` takes `axis`."""
    try:
        values = np.asarray(stat(samples, axis=-1), dtype=np.float64)
        if values.shape == samples.shape[:-1]:
            return values
    except TypeError:
        pass
    return np.apply_along_axis(lambda row: float(stat(row)), -1, samples)


def _interval(values: np.ndarray, confidence: float, axis: int = 0) -> tuple[Any, Any]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(values, [100.0 * alpha, 100.0 * (1.0 - alpha)], axis=axis)
    return low, high


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def bootstrap_ci(
    x: Any,
    stat: Statistic = np.mean,
    confidence: float = 0.9,
    n_resamples: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval `(low, high)` of `stat(x)`.

    Resamples `x` with replacement `n_resamples` times. The resampling indices are drawn exactly as
    `scipy.stats.bootstrap(..., method="percentile", rng=np.random.default_rng(seed))` draws them,
    so the two agree. `stat` may take an `axis` keyword (vectorised) or reduce a 1-D array.
    A single observation gives the degenerate interval `(x, x)`.
    """
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    sample = _as_1d(x)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, sample.size, (n_resamples, sample.size))
    low, high = _interval(_apply_stat(stat, sample[index]), confidence)
    return float(low), float(high)


# --------------------------------------------------------------------------------------------
# Tests against a reference
# --------------------------------------------------------------------------------------------


class PairedTest(NamedTuple):
    """Paired comparison of `x` with `ref` (same seeds): differences `d = x - ref`."""

    n: int  # pairs used (pairs with a non-finite member are dropped)
    mean_diff: float  # mean of d
    ci_low: float  # bootstrap CI of mean(d)
    ci_high: float
    t_statistic: float  # paired t-test (scipy.stats.ttest_rel)
    t_pvalue: float
    wilcoxon_statistic: float  # Wilcoxon signed-rank (NaN when all d are 0 or n < 2)
    wilcoxon_pvalue: float


class WelchTest(NamedTuple):
    """Unpaired comparison of `x` with `ref`: Welch's t-test (unequal variances)."""

    n: int
    n_ref: int
    mean_diff: float  # mean(x) - mean(ref)
    ci_low: float  # bootstrap CI of mean(x) - mean(ref), groups resampled independently
    ci_high: float
    t_statistic: float  # scipy.stats.ttest_ind(equal_var=False)
    t_pvalue: float


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def paired_test(
    x: Any,
    ref: Any,
    confidence: float = 0.9,
    n_resamples: int = 10000,
    seed: int = 0,
) -> PairedTest:
    """Paired t-test and Wilcoxon signed-rank test of `x` against `ref`, paired by position (seed).

    Two-sided. The Wilcoxon test needs no normality assumption but, with n pairs, its smallest
    possible p-value is 2 / 2**n (0.0625 for n = 5), so it can only reject for n >= 6.
    """
    a, b = _as_1d(x, "x"), _as_1d(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"paired test needs equally many seeds, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = int(d.size)
    nan = float("nan")
    if n == 0:
        return PairedTest(0, nan, nan, nan, nan, nan, nan, nan)
    ci_low, ci_high = bootstrap_ci(d, np.mean, confidence, n_resamples, seed)
    t_stat, t_p = nan, nan
    if n >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # zero variance: scipy returns NaN
            result = scipy.stats.ttest_rel(a[keep], b[keep])
        t_stat, t_p = float(result.statistic), float(result.pvalue)
    w_stat, w_p = nan, nan
    if n >= 2 and np.any(d != 0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = scipy.stats.wilcoxon(d)
        w_stat, w_p = float(result.statistic), float(result.pvalue)
    return PairedTest(n, float(d.mean()), ci_low, ci_high, t_stat, t_p, w_stat, w_p)


def welch_test(
    x: Any,
    ref: Any,
    confidence: float = 0.9,
    n_resamples: int = 10000,
    seed: int = 0,
) -> WelchTest:
    """Welch's two-sided t-test of `x` against `ref` (independent seeds; non-finite dropped)."""
    a, b = _finite(_as_1d(x, "x")), _finite(_as_1d(ref, "ref"))
    nan = float("nan")
    if a.size == 0 or b.size == 0:
        return WelchTest(int(a.size), int(b.size), nan, nan, nan, nan, nan)
    _check_confidence(confidence)
    rng = np.random.default_rng(seed)
    boot_a = a[rng.integers(0, a.size, (n_resamples, a.size))].mean(axis=1)
    boot_b = b[rng.integers(0, b.size, (n_resamples, b.size))].mean(axis=1)
    ci_low, ci_high = _interval(boot_a - boot_b, confidence)
    t_stat, t_p = nan, nan
    if a.size >= 2 and b.size >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = scipy.stats.ttest_ind(a, b, equal_var=False)
        t_stat, t_p = float(result.statistic), float(result.pvalue)
    return WelchTest(
        int(a.size), int(b.size), float(a.mean() - b.mean()), float(ci_low), float(ci_high),
        t_stat, t_p,
    )


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One optimizer on one task. `dataclasses.asdict(row)` gives a JSON-ready dict (NaN aside)."""

    optimizer: str
    n: int  # finite scores (seeds)
    mean: float
    iqm: float
    ci_low: float  # bootstrap CI of the mean
    ci_high: float
    diff: float  # vs the reference: mean paired difference, or difference of means (Welch)
    diff_ci_low: float
    diff_ci_high: float
    pvalue: float  # paired t-test or Welch t-test
    wilcoxon_pvalue: float  # paired only, else NaN
    verdict: str  # "better" / "worse" / "tie" at alpha; "reference" for the reference itself


def _verdict(diff: float, pvalue: float, alpha: float, higher_is_better: bool) -> str:
    if not (np.isfinite(pvalue) and pvalue < alpha and diff != 0):
        return "tie"
    return "better" if (diff > 0) == higher_is_better else "worse"


def summarize(
    scores: Mapping[str, Any],
    reference: str | None = "adam",
    paired: bool = True,
    confidence: float = 0.9,
    alpha: float = 0.05,
    n_resamples: int = 10000,
    seed: int = 0,
    higher_is_better: bool = True,
) -> list[SummaryRow]:
    """Table rows comparing per-seed scores of several optimizers on one task.

    `scores` maps optimizer name -> per-seed scores. Non-finite scores are dropped (and `n` counts
    only the finite ones). With `paired=True` the i-th score of every optimizer comes from the same
    seed as the i-th score of the reference (paired t-test + Wilcoxon); otherwise Welch's t-test.
    The verdict uses the t-test p-value at level `alpha`, without multiple-comparison correction.
    `reference=None` skips the comparisons (diff, p-values NaN, verdict "tie").
    Rows keep the order of `scores`.
    """
    if not scores:
        raise ValueError("summarize needs at least one optimizer's scores")
    if reference is not None and reference not in scores:
        raise ValueError(
            f"reference optimizer {reference!r} not among the scores: {', '.join(scores)}"
        )
    ref_scores = None if reference is None else _as_1d(scores[reference], reference)
    nan = float("nan")
    rows = []
    for name, values in scores.items():
        raw = _as_1d(values, name)
        sample = _finite(raw)
        if sample.size:
            ci_low, ci_high = bootstrap_ci(sample, np.mean, confidence, n_resamples, seed)
            stats_ = (float(sample.mean()), iqm(sample), ci_low, ci_high)
        else:
            stats_ = (nan, nan, nan, nan)
        comparison = (nan, nan, nan, nan, nan)
        verdict = "tie"
        if ref_scores is not None and name == reference:
            comparison = (0.0, 0.0, 0.0, nan, nan)
            verdict = "reference"
        elif ref_scores is not None and paired:
            test = paired_test(raw, ref_scores, confidence, n_resamples, seed)
            comparison = (test.mean_diff, test.ci_low, test.ci_high, test.t_pvalue,
                          test.wilcoxon_pvalue)
            verdict = _verdict(test.mean_diff, test.t_pvalue, alpha, higher_is_better)
        elif ref_scores is not None:
            test = welch_test(raw, ref_scores, confidence, n_resamples, seed)
            comparison = (test.mean_diff, test.ci_low, test.ci_high, test.t_pvalue, nan)
            verdict = _verdict(test.mean_diff, test.t_pvalue, alpha, higher_is_better)
        rows.append(SummaryRow(name, int(sample.size), *stats_, *comparison, verdict))
    return rows


@dataclasses.dataclass(frozen=True)
class AggregateRow:
    """One optimizer aggregated over tasks, on reference-normalised scores."""

    optimizer: str
    n_tasks: int
    n_runs: int  # (task, seed) pairs
    iqm: float
    ci_low: float  # stratified-bootstrap CI of the IQM
    ci_high: float
    mean: float


def normalize_scores(
    scores_by_task: Mapping[str, Mapping[str, Any]],
    reference: str = "adam",
    baselines: Mapping[str, float] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Normalise every task's scores by the reference optimizer's mean score on that task.

    With `m` the reference's mean (finite seeds) on a task, a score `s` becomes
    `1 + (s - m) / |m|`: the reference averages exactly 1, order is preserved whatever the sign of
    `m`, and for positive `m` this is plain `s / m`. When `m` is 0 the scale falls back to the
    standard deviation of all finite scores on the task (then to 1 if that is 0 too).
    With `baselines[task] = b` (e.g. a random policy's score) the classic normalisation
    `(s - b) / (m - b)` is used instead (0 = baseline, 1 = reference); `m == b` raises ValueError.
    Returns `{task: {optimizer: normalised array}}`.
    """
    normalised: dict[str, dict[str, np.ndarray]] = {}
    for task, scores in scores_by_task.items():
        if reference not in scores:
            raise ValueError(f"task {task!r} has no scores for the reference {reference!r}")
        ref = _finite(_as_1d(scores[reference], reference))
        if ref.size == 0:
            raise ValueError(f"task {task!r}: the reference {reference!r} has no finite score")
        m = float(ref.mean())
        arrays = {name: _as_1d(values, name) for name, values in scores.items()}
        if baselines is not None and task in baselines:
            b = float(baselines[task])
            if m == b:
                raise ValueError(f"task {task!r}: reference mean equals the baseline score {b}")
            normalised[task] = {name: (s - b) / (m - b) for name, s in arrays.items()}
            continue
        scale = abs(m)
        if scale == 0.0:
            pooled = _finite(np.concatenate(list(arrays.values())))
            scale = float(pooled.std()) or 1.0
        normalised[task] = {name: 1.0 + (s - m) / scale for name, s in arrays.items()}
    return normalised


def aggregate_tasks(
    scores_by_task: Mapping[str, Mapping[str, Any]],
    reference: str = "adam",
    confidence: float = 0.9,
    n_resamples: int = 10000,
    seed: int = 0,
    baselines: Mapping[str, float] | None = None,
) -> list[AggregateRow]:
    """IQM over tasks and seeds of reference-normalised scores, with a stratified-bootstrap CI.

    Scores are normalised per task by `normalize_scores` (reference = 1). The IQM pools all finite
    (task, seed) pairs of an optimizer; the bootstrap resamples seeds within each task (stratified,
    as rliable does), so every resample keeps each task's weight. An optimizer missing from some
    tasks is aggregated over the tasks it has (`n_tasks` says how many). Rows are ordered by first
    appearance.
    """
    _check_confidence(confidence)
    normalised = normalize_scores(scores_by_task, reference, baselines)
    names: list[str] = []
    for scores in normalised.values():
        names.extend(name for name in scores if name not in names)
    rng = np.random.default_rng(seed)
    nan = float("nan")
    rows = []
    for name in names:
        per_task = [_finite(scores[name]) for scores in normalised.values() if name in scores]
        per_task = [s for s in per_task if s.size]
        if not per_task:
            rows.append(AggregateRow(name, 0, 0, nan, nan, nan, nan))
            continue
        pooled = np.concatenate(per_task)
        resampled = np.concatenate(
            [s[rng.integers(0, s.size, (n_resamples, s.size))] for s in per_task], axis=1
        )
        low, high = _interval(iqm(resampled, axis=-1), confidence)
        rows.append(
            AggregateRow(name, len(per_task), int(pooled.size), iqm(pooled), float(low),
                         float(high), float(pooled.mean()))
        )
    return rows


_HEADERS = {
    "optimizer": "optimizer",
    "n": "n",
    "n_tasks": "tasks",
    "n_runs": "runs",
    "mean": "mean",
    "iqm": "IQM",
    "ci_low": "CI low",
    "ci_high": "CI high",
    "diff": "diff vs ref",
    "diff_ci_low": "diff CI low",
    "diff_ci_high": "diff CI high",
    "pvalue": "p (t-test)",
    "wilcoxon_pvalue": "p (Wilcoxon)",
    "verdict": "verdict",
}


def _cell(value: Any, float_format: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "—" if math.isnan(value) else float_format.format(float(value))
    return str(value).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Any],
    columns: Sequence[str] | None = None,
    float_format: str = "{:.4g}",
) -> str:
    """A paste-ready GitHub-Markdown table of `rows` (dataclasses such as `SummaryRow`, or dicts).

    `columns` picks and orders fields (default: all fields of the first row). NaN shows as "—".
    Numbers are right-aligned. Ends with a newline.
    """
    if not rows:
        raise ValueError("markdown_table needs at least one row")
    dicts = [
        dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row) for row in rows
    ]
    if columns is None:
        columns = list(dicts[0])
    missing = [c for c in columns if c not in dicts[0]]
    if missing:
        raise ValueError(f"unknown table columns: {', '.join(missing)}")
    header = "| " + " | ".join(_HEADERS.get(c, c) for c in columns) + " |"
    numeric = [
        isinstance(dicts[0][c], (int, float, np.integer, np.floating))
        and not isinstance(dicts[0][c], bool)
        for c in columns
    ]
    rule = "|" + "|".join("---:" if num else "---" for num in numeric) + "|"
    body = [
        "| " + " | ".join(_cell(d.get(c), float_format) for c in columns) + " |" for d in dicts
    ]
    return "\n".join([header, rule, *body]) + "\n"


# --------------------------------------------------------------------------------------------
# Learning-curve bands
# --------------------------------------------------------------------------------------------


class CurveBand(NamedTuple):
    """Mean curve over seeds and the bootstrap confidence band around it, each `[T]`."""

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def curve_band(
    curves: Any,
    confidence: float = 0.9,
    n_resamples: int = 2000,
    seed: int = 0,
) -> CurveBand:
    """Mean over seeds of `curves[seeds, T]` with a pointwise percentile-bootstrap band.

    Seeds are resampled with replacement; each resample's mean curve is a multinomial-weighted
    average of the seeds' curves (one matrix product), computed in chunks of T to bound memory.
    NaN entries (nothing logged yet) are ignored per time step; a step where every resampled seed is
    NaN gives NaN. A single seed gives a zero-width band.
    """
    _check_confidence(confidence)
    values = np.asarray(curves, dtype=np.float64)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"curve_band needs curves of shape [seeds, T], got {values.shape}")
    n_seeds, length = values.shape
    logged = np.isfinite(values)
    filled = np.where(logged, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        center = filled.sum(0) / logged.sum(0)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=n_resamples)
    weights = weights.astype(np.float64)
    low = np.empty(length)
    high = np.empty(length)
    chunk = max(1, 4_000_000 // max(1, n_resamples))
    for start in range(0, length, chunk):
        part = slice(start, start + chunk)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (weights @ filled[:, part]) / (weights @ logged[:, part])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
            low[part], high[part] = _interval_nan(boot, confidence)
    return CurveBand(center, low, high)


def _interval_nan(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    alpha = (1.0 - confidence) / 2.0
    if np.isnan(values).any():
        low, high = np.nanpercentile(values, [100.0 * alpha, 100.0 * (1.0 - alpha)], axis=0)
    else:
        low, high = np.percentile(values, [100.0 * alpha, 100.0 * (1.0 - alpha)], axis=0)
    return low, high
