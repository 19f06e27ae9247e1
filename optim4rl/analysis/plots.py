"""Figures: learning curves, scores, gradient histograms and drift, meta-training progress.

This is the only module that draws.

matplotlib is imported on first use and only through its object-oriented API with the Agg canvas
(no pyplot, no global backend switch), so these functions are safe in scripts, tests and notebooks.
Every function writes its figure and returns the paths written: a path without a suffix gives
both `PATH.png` and `PATH.svg`; a path ending in `.png`, `.svg` or `.pdf` gives that file only; a
sequence of paths gives each of them.

Colours are the Okabe–Ito palette (distinguishable under the common colour-vision deficiencies),
with line styles as a second cue.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from optim4rl.analysis import gradients, stats

__all__ = [
    "COLORS",
    "plot_drift",
    "plot_gradient_histograms",
    "plot_learning_curves",
    "plot_meta_training",
    "plot_scores",
]

# Okabe & Ito (2008), "Color Universal Design".
COLORS = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
LINESTYLES = ("-", "--", "-.", ":")
PathLike = str | os.PathLike
Paths = PathLike | Sequence[PathLike]


def _color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def _linestyle(index: int) -> str:
    return LINESTYLES[(index // len(COLORS)) % len(LINESTYLES)]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _targets(path: Paths) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        path = Path(path)
        if path.suffix.lower() in (".png", ".svg", ".pdf"):
            return [path]
        return [path.with_name(path.name + ".png"), path.with_name(path.name + ".svg")]
    targets = [Path(p) for p in path]
    if not targets:
        raise ValueError("no output path given")
    return targets


def _save(figure, path: Paths, tight_layout: bool = True) -> list[Path]:
    if tight_layout:
        figure.tight_layout()
    written = []
    for target in _targets(path):
        target.parent.mkdir(parents=True, exist_ok=True)
        # bbox "tight" keeps a title wider than a narrow figure (few optimizers) from being clipped.
        figure.savefig(target, bbox_inches="tight")
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------
# Learning curves and scores
# --------------------------------------------------------------------------------------------


def plot_learning_curves(
    curves: Mapping[str, tuple[Any, Any]],
    path: Paths,
    title: str | None = None,
    xlabel: str = "environment steps",
    ylabel: str = "episode return",
    confidence: float = 0.9,
    n_resamples: int = 2000,
) -> list[Path]:
    """Mean learning curve per optimizer with a bootstrap confidence band over seeds.

    `curves[name] = (x, y)` with `y[seeds, T]` (or `[T]` for one seed) and `x[T]` (or `[seeds, T]`,
    averaged over seeds: environment steps coincide across seeds). NaN entries (nothing logged yet)
    are skipped. The band is `stats.curve_band` (90% by default).
    """
    if not curves:
        raise ValueError("plot_learning_curves needs at least one curve")
    figure = _figure(7.0, 4.5)
    axes = figure.add_subplot()
    for index, (name, (x, y)) in enumerate(curves.items()):
        y = np.asarray(y, dtype=np.float64)
        y = y[None] if y.ndim == 1 else y
        x = np.asarray(x, dtype=np.float64)
        x = x.mean(axis=0) if x.ndim == 2 else x
        if x.shape != y.shape[-1:]:
            raise ValueError(f"{name}: x has {x.shape[-1]} points but y has {y.shape[-1]}")
        band = stats.curve_band(y, confidence, n_resamples)
        n_seeds = y.shape[0]
        label = f"{name} (n={n_seeds})"
        # A run with one logged point draws a marker: a line through one point is invisible.
        axes.plot(x, band.mean, color=_color(index), linestyle=_linestyle(index), lw=1.8,
                  label=label, marker="o" if x.size == 1 else None)
        if n_seeds > 1:
            axes.fill_between(x, band.low, band.high, color=_color(index), alpha=0.2, lw=0)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title or f"{ylabel} (mean, {confidence:.0%} bootstrap CI over seeds)")
    axes.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4), useMathText=True)
    axes.grid(alpha=0.3)
    axes.legend(frameon=False, title=f"shaded: {confidence:.0%} bootstrap CI",
                title_fontsize="small")
    return _save(figure, path)


def plot_scores(
    scores: Mapping[str, Any] | Sequence[stats.SummaryRow],
    path: Paths,
    title: str | None = None,
    ylabel: str = "score (mean of last returns)",
    statistic: str = "mean",
    confidence: float = 0.9,
    reference: str | None = None,
) -> list[Path]:
    """Final scores per optimizer: a bar at the mean (or IQM), a CI error bar, one dot per seed.

    `scores` is `{optimizer: per-seed scores}` (dots are drawn and the CI is the bootstrap CI of
    `statistic`) or the rows of `stats.summarize` (bar at the mean with the rows' CI, no dots).
    `reference` draws a dashed horizontal line at that optimizer's value.
    """
    if statistic not in ("mean", "iqm"):
        raise ValueError(f"statistic must be 'mean' or 'iqm', got {statistic!r}")
    if not scores:
        raise ValueError("plot_scores needs at least one optimizer")
    names: list[str] = []
    centers, lows, highs, seeds = [], [], [], []
    if isinstance(scores, Mapping):
        stat = np.mean if statistic == "mean" else stats.iqm
        for name, values in scores.items():
            sample = np.asarray(values, dtype=np.float64).reshape(-1)
            sample = sample[np.isfinite(sample)]
            names.append(name)
            seeds.append(sample)
            if sample.size == 0:
                center = low = high = np.nan
            else:
                center = float(stat(sample))
                low, high = stats.bootstrap_ci(sample, stat, confidence)
            centers.append(center)
            lows.append(low)
            highs.append(high)
    else:
        if statistic != "mean":
            raise ValueError("summary rows carry the CI of the mean; use statistic='mean'")
        for row in scores:
            names.append(row.optimizer)
            centers.append(row.mean)
            lows.append(row.ci_low)
            highs.append(row.ci_high)
            seeds.append(np.empty(0))
    centers, lows, highs = map(np.asarray, (centers, lows, highs))
    positions = np.arange(len(names))
    figure = _figure(max(4.0, 1.1 * len(names) + 2.0), 4.5)
    axes = figure.add_subplot()
    colors = [_color(i) for i in range(len(names))]
    axes.bar(positions, centers, width=0.6, color=colors, alpha=0.35, edgecolor=colors, lw=1.2)
    errors = np.stack([centers - lows, highs - centers])
    axes.errorbar(positions, centers, yerr=np.where(np.isfinite(errors), errors, 0.0), fmt="none",
                  ecolor="black", capsize=5, lw=1.4, label=f"{confidence:.0%} bootstrap CI")
    jitter = np.random.default_rng(0)
    for position, sample, color in zip(positions, seeds, colors):
        if sample.size:
            offsets = jitter.uniform(-0.15, 0.15, sample.size)
            axes.scatter(position + offsets, sample, s=16, color=color, edgecolor="black",
                         linewidth=0.4, zorder=3)
    if reference is not None:
        if reference not in names:
            raise ValueError(f"reference {reference!r} not among {', '.join(names)}")
        axes.axhline(centers[names.index(reference)], color="black", ls="--", lw=1,
                     label=f"{reference} {statistic}")
    axes.set_xticks(positions, names, rotation=20 if len(names) > 4 else 0)
    axes.set_xlabel("optimizer")
    axes.set_ylabel(ylabel)
    axes.set_title(title or f"final score: {statistic.upper() if statistic == 'iqm' else statistic}"
                   f" over seeds, dots = seeds")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(frameon=False)
    return _save(figure, path)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def _snapshots(source: Any) -> np.ndarray:
    grads = source.grads if isinstance(source, gradients.GradientRecord) else source
    grads = np.asarray(grads, dtype=np.float64)
    if grads.ndim == 1:
        grads = grads[:, None]
    if grads.ndim != 2:
        raise ValueError(f"gradients must be [snapshot, coord], got shape {grads.shape}")
    return grads


def plot_gradient_histograms(
    record_by_name: Mapping[str, Any],
    path: Paths,
    n_phases: int = 3,
    bins: int = 100,
    eps: float = gradients.LOG_EPS,
    title: str | None = None,
) -> list[Path]:
    """Agent-gradient distributions by training phase, one row per source, in one figure.

    Each value of `record_by_name` is a `GradientRecord` or `grads[snapshot, coord]`, e.g.
    `{"A2C big_dense_long": rl_record, "digits classifier": sl_record}`. Left column: histogram of g
    with a log-count axis (heavy tails); right column: histogram of `log10(|g| + eps)` (the orders
    of magnitude g spans), on one x-axis shared by all sources. Phases are consecutive thirds of the recorded snapshots (early, middle,
    late); a shift between them is the non-stationarity the paper points out.
    """
    if not record_by_name:
        raise ValueError("plot_gradient_histograms needs at least one gradient source")
    sources = {}
    for name, source in record_by_name.items():
        phases = gradients.split_phases(_snapshots(source), n_phases)
        everything = np.concatenate([p.reshape(-1) for p in phases.values()])
        everything = everything[np.isfinite(everything)]
        if everything.size == 0:
            raise ValueError(f"{name}: no finite gradients")
        sources[name] = (phases, everything)
    # One log-magnitude axis for all sources, so RL and supervised spreads compare at a glance.
    log_low = min(float(gradients.log_magnitude(v, eps).min()) for _, v in sources.values())
    log_high = max(float(gradients.log_magnitude(v, eps).max()) for _, v in sources.values())
    log_edges = np.linspace(log_low, log_high + 1e-9, bins + 1)
    figure = _figure(11.0, 3.2 * len(sources) + 0.6)
    grid = figure.subplots(len(sources), 2, squeeze=False)
    for row, (name, (phases, everything)) in enumerate(sources.items()):
        limit = float(np.max(np.abs(everything))) or 1.0
        linear_edges = np.linspace(-limit, limit, bins + 1)
        ax_linear, ax_log = grid[row]
        for index, (phase, values) in enumerate(phases.items()):
            style = dict(color=_color(index), linestyle=LINESTYLES[index % len(LINESTYLES)],
                         lw=1.4, label=phase)
            counts, _ = gradients.histogram(values, bins=linear_edges)
            ax_linear.stairs(np.where(counts > 0, counts, np.nan), linear_edges, **style)
            counts, _ = gradients.log_histogram(values, bins=log_edges, eps=eps)
            ax_log.stairs(counts, log_edges, **style)
        summary = gradients.summary_stats(everything, eps)
        ax_linear.set_yscale("log")
        ax_linear.set_xlabel("gradient g")
        ax_linear.set_ylabel("count (log scale)")
        ax_linear.set_title(f"{name}: g")
        ax_linear.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useMathText=True)
        ax_log.set_xlabel(f"log10(|g| + {eps:g})")
        ax_log.set_ylabel("count")
        ax_log.set_title(f"{name}: log10|g| (p1–p99: {summary.orders_of_magnitude:.1f} decades)")
        ax_log.set_ylim(0, 1.3 * ax_log.get_ylim()[1])  # headroom for the legend
        for axes in (ax_linear, ax_log):
            axes.grid(alpha=0.3)
            axes.legend(title="training phase", frameon=False, fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_drift(
    record_by_name: Mapping[str, Any],
    path: Paths,
    n_phases: int = 3,
    metric: str = "wasserstein",
    eps: float = gradients.LOG_EPS,
    title: str | None = None,
) -> list[Path]:
    """Heatmaps of the distribution drift between training phases, one panel per gradient source.

    Entry (i, j) is `gradients.drift` between phases i and j of `log10(|g| + eps)`: the Wasserstein
    distance in decades (`metric="wasserstein"`) or the KS statistic (`"ks"`). All panels share one
    colour scale so sources compare directly (an i.i.d. source is near 0 everywhere).
    """
    if not record_by_name:
        raise ValueError("plot_drift needs at least one gradient source")
    matrices = {
        name: gradients.drift_matrix(
            gradients.split_phases(_snapshots(source), n_phases), metric, eps
        )
        for name, source in record_by_name.items()
    }
    labels = gradients.phase_names(n_phases)
    vmax = max(float(m.max()) for m in matrices.values()) or 1.0
    panels = len(matrices)
    figure = _figure(3.6 * panels + 1.2, 3.6)
    grid = figure.subplots(1, panels, squeeze=False)[0]
    image = None
    for axes, (name, matrix) in zip(grid, matrices.items()):
        image = axes.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax)
        for i in range(n_phases):
            for j in range(n_phases):
                shade = "white" if matrix[i, j] < 0.6 * vmax else "black"
                axes.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color=shade,
                          fontsize="small")
        axes.set_xticks(range(n_phases), labels)
        axes.set_yticks(range(n_phases), labels)
        axes.set_xlabel("training phase")
        axes.set_title(name)
    grid[0].set_ylabel("training phase")
    unit = "Wasserstein-1 of log10|g| (decades)" if metric == "wasserstein" else "KS statistic"
    figure.colorbar(image, ax=list(grid), label=unit, shrink=0.9)
    figure.suptitle(title or "drift of the gradient distribution between training phases")
    figure.set_layout_engine("constrained")  # tight_layout cannot place a shared colorbar
    return _save(figure, path, tight_layout=False)


# --------------------------------------------------------------------------------------------
# Meta-training
# --------------------------------------------------------------------------------------------


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    values = []
    for row in rows:
        value = row.get(key)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            values.append(np.nan)
    return np.asarray(values)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing NaN-aware moving average (the meta-loss of one iteration is very noisy)."""
    if window <= 1:
        return y
    logged = np.isfinite(y)
    totals = np.cumsum(np.where(logged, y, 0.0))
    counts = np.cumsum(logged)
    totals[window:] = totals[window:] - totals[:-window]
    counts[window:] = counts[window:] - counts[:-window]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def plot_meta_training(
    rows: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    age_bins: int,
    path: Paths,
    title: str | None = None,
) -> list[Path]:
    """Progress of pipeline meta-training from its `metrics.csv` rows (one row per meta-iteration).

    Top: meta-loss and meta-gradient norm per task (thin: every iteration; thick: moving average),
    and the evaluation return of fresh agents trained with the current φ when logged. Below, one
    panel per task: the latest episode return of the population's agents grouped by age (fraction
    of the reset interval since their last reset) — with pipeline training every age bin is
    present at every iteration, so the meta-batch mixes early, middle and late training.
    Columns that are absent are skipped.
    """
    if not rows:
        raise ValueError("plot_meta_training needs at least one metrics row")
    iteration = _column(rows, "iteration")
    window = max(1, len(rows) // 50)
    per_row = 3
    task_rows = -(-len(tasks) // per_row) if tasks else 0
    figure = _figure(13.0, 3.4 * (1 + task_rows) + 0.4)
    grid = figure.add_gridspec(1 + task_rows, per_row)
    top = [figure.add_subplot(grid[0, k]) for k in range(per_row)]
    for axes, prefix, label in ((top[0], "meta_loss", "meta-loss"),
                                (top[1], "meta_grad_norm", "meta-gradient norm")):
        for index, task in enumerate(tasks):
            y = _column(rows, f"{prefix}/{task}")
            if np.isfinite(y).any():
                color = _color(index)
                axes.plot(iteration, y, color=color, lw=0.6, alpha=0.35)
                axes.plot(iteration, _smooth(y, window), color=color, lw=1.6,
                          linestyle=_linestyle(index), label=task)
        axes.set_title(f"{label} per task")
        axes.set_xlabel("meta-iteration")
        axes.set_ylabel(label)
        if prefix == "meta_grad_norm":
            axes.set_yscale("log")
    evaluation = _column(rows, "eval_return")
    logged = np.isfinite(evaluation)
    if logged.any():
        top[2].plot(iteration[logged], evaluation[logged], "o-", color=_color(0), lw=1.6, ms=4)
    else:
        top[2].text(0.5, 0.5, "no evaluations logged", ha="center", va="center",
                    transform=top[2].transAxes, color="gray")
    top[2].set_title("fresh agent trained with current φ")
    top[2].set_xlabel("meta-iteration")
    top[2].set_ylabel("evaluation return")
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(grid[1 + index // per_row, index % per_row])
        for age in range(age_bins):
            y = _column(rows, f"return_age{age}/{task}")
            if np.isfinite(y).any():
                low, high = age / age_bins, (age + 1) / age_bins
                axes.plot(iteration, _smooth(y, window), color=_color(age),
                          linestyle=_linestyle(age), lw=1.4, label=f"{low:.2g}–{high:.2g}")
        axes.set_title(f"{task}: return by agent age")
        axes.set_xlabel("meta-iteration")
        axes.set_ylabel("latest episode return")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(frameon=False, fontsize="small", title="age / reset interval",
                        title_fontsize="small")
    for axes in figure.axes:
        axes.grid(alpha=0.3)
    if top[0].get_legend_handles_labels()[0]:
        top[0].legend(frameon=False, fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)
