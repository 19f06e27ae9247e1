"""Agent-gradient analysis (docs/paper_settings.md §5.4): distributions, their drift over training, the file format.

The paper's argument (Lan et al. 2023, Sec. 4) is that RL agent-gradients differ from supervised
ones: their magnitudes span many orders of magnitude (hence the `[sign g, log|g|]` processing) and
their distribution drifts during training (non-i.i.d., hence pipeline training). These functions
measure both on recorded gradients.

A gradient record holds `grads[snapshot, coord]` (one flattened agent gradient per recorded update),
optionally the optimizer's `updates[snapshot, coord]`, the update index of every snapshot `steps`,
and `layer_ids[coord]` indexing `layer_names`. It is stored as a compressed `.npz` readable with
`np.load(allow_pickle=False)`, with the run's metadata (env, agent, optimizer, seed, ...) as a JSON
string.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.stats

from optim4rl.errors import Optim4RLError

__all__ = [
    "Drift",
    "GradientRecord",
    "GradientSummary",
    "drift",
    "drift_matrix",
    "flatten_tree",
    "histogram",
    "load_gradient_record",
    "log_histogram",
    "log_magnitude",
    "phase_names",
    "save_gradient_record",
    "split_phases",
    "summary_stats",
]

LOG_EPS = 1e-8  # the paper's histograms show log10(|g| + 1e-8)
FORMAT_VERSION = 1


def _finite_flat(g: Any) -> np.ndarray:
    values = np.asarray(g, dtype=np.float64).reshape(-1)
    return values[np.isfinite(values)]


def log_magnitude(g: Any, eps: float = LOG_EPS) -> np.ndarray:
    """`log10(|g| + eps)`, elementwise; eps floors exact zeros at log10(eps) (-8 by default)."""
    return np.log10(np.abs(np.asarray(g, dtype=np.float64)) + eps)


def histogram(
    g: Any, bins: int | Sequence[float] = 100, range: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram `(counts, edges)` of the finite values of `g` (all shapes flattened).

    Counts rather than densities, for log-count plots: heavy tails show up as counts far from 0.
    Without `range` and with integer `bins`, the bins span `[min, max]`, so counts sum to the
    number of finite values.
    """
    return np.histogram(_finite_flat(g), bins=bins, range=range)


def log_histogram(
    g: Any,
    bins: int | Sequence[float] = 100,
    range: tuple[float, float] | None = None,
    eps: float = LOG_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Histogram `(counts, edges)` of `log10(|g| + eps)` over the finite values of `g`."""
    return np.histogram(log_magnitude(_finite_flat(g), eps), bins=bins, range=range)


def phase_names(n_phases: int) -> list[str]:
    """`["early", "middle", "late"]` for 3 phases, `["early", "late"]` for 2, else "phase k"."""
    named = {1: ["all"], 2: ["early", "late"], 3: ["early", "middle", "late"]}
    return named.get(n_phases, [f"phase {k + 1}" for k in range(n_phases)])


def split_phases(snapshots: Any, n_phases: int = 3) -> dict[str, np.ndarray]:
    """Split snapshots, ordered by training time along axis 0, into consecutive phases.

    `snapshots` is `grads[snapshot, coord]` (or a `GradientRecord`, whose `grads` are used). Phases
    are as equal as possible (`np.array_split`). Returns `{phase name: snapshots}` in time order.
    """
    if isinstance(snapshots, GradientRecord):
        snapshots = snapshots.grads
    values = np.asarray(snapshots)
    if n_phases < 1:
        raise ValueError(f"n_phases must be positive, got {n_phases}")
    if values.ndim == 0 or values.shape[0] < n_phases:
        raise ValueError(
            f"need at least {n_phases} snapshots to split into {n_phases} phases, "
            f"got {0 if values.ndim == 0 else values.shape[0]}"
        )
    return dict(zip(phase_names(n_phases), np.array_split(values, n_phases, axis=0)))


class Drift(NamedTuple):
    """How far apart two gradient samples are, on the log10|g| scale."""

    wasserstein: float  # 1-D earth mover's distance, in orders of magnitude (decades)
    ks_statistic: float  # two-sample Kolmogorov-Smirnov statistic, in [0, 1]
    ks_pvalue: float  # tiny for any real difference: gradient samples are huge


def _subsample(values: np.ndarray, max_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_samples is not None and values.size > max_samples:
        return rng.choice(values, size=max_samples, replace=False)
    return values


def drift(
    a: Any, b: Any, eps: float = LOG_EPS, max_samples: int | None = 200_000, seed: int = 0
) -> Drift:
    """Distribution shift between two gradient samples (e.g. two training phases).

    Compares the distributions of `log10(|g| + eps)`: the Wasserstein-1 distance (how many orders of
    magnitude the mass moves; 0 for identical samples, `c` for a pure shift by a factor `10**c`) and
    the KS statistic. Samples above `max_samples` are subsampled without replacement for speed.
    """
    rng = np.random.default_rng(seed)
    log_a = log_magnitude(_subsample(_finite_flat(a), max_samples, rng), eps)
    log_b = log_magnitude(_subsample(_finite_flat(b), max_samples, rng), eps)
    if log_a.size == 0 or log_b.size == 0:
        raise ValueError("drift needs two non-empty samples of finite gradients")
    ks = scipy.stats.ks_2samp(log_a, log_b)
    return Drift(
        float(scipy.stats.wasserstein_distance(log_a, log_b)),
        float(ks.statistic),
        float(ks.pvalue),
    )


def drift_matrix(
    phases: Mapping[str, Any] | Sequence[Any],
    metric: str = "wasserstein",
    eps: float = LOG_EPS,
    max_samples: int | None = 200_000,
    seed: int = 0,
) -> np.ndarray:
    """Symmetric `[n, n]` matrix of `drift(...)` between every pair of phases (zero diagonal).

    `phases` is `split_phases(...)`'s dict or any sequence of samples; `metric` is
    `"wasserstein"` or `"ks"` (the KS statistic).
    """
    if metric not in ("wasserstein", "ks"):
        raise ValueError(f"unknown drift metric {metric!r}; use 'wasserstein' or 'ks'")
    samples = list(phases.values()) if isinstance(phases, Mapping) else list(phases)
    n = len(samples)
    matrix = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d = drift(samples[i], samples[j], eps, max_samples, seed)
            value = d.wasserstein if metric == "wasserstein" else d.ks_statistic
            matrix[i, j] = matrix[j, i] = value
    return matrix


class GradientSummary(NamedTuple):
    """Scale statistics of a gradient sample."""

    n: int  # finite values
    n_nonfinite: int
    mean_abs: float
    std: float
    log10_p1: float  # 1st percentile of log10(|g| + eps)
    log10_median: float
    log10_p99: float
    orders_of_magnitude: float  # log10_p99 - log10_p1: the decades the bulk of |g| spans
    fraction_below_1e6: float  # fraction with |g| < 1e-6
    fraction_zero: float
    excess_kurtosis: float  # heavy tails: 0 for a Gaussian, large for RL gradients


def summary_stats(g: Any, eps: float = LOG_EPS) -> GradientSummary:
    """How widely a gradient sample's magnitudes spread (flattened, non-finite values dropped)."""
    raw = np.asarray(g, dtype=np.float64).reshape(-1)
    values = raw[np.isfinite(raw)]
    nan = float("nan")
    if values.size == 0:
        return GradientSummary(0, int(raw.size), nan, nan, nan, nan, nan, nan, nan, nan, nan)
    p1, p50, p99 = np.percentile(log_magnitude(values, eps), [1.0, 50.0, 99.0])
    std = float(values.std())
    kurtosis = float(scipy.stats.kurtosis(values)) if std > 0 else nan
    magnitude = np.abs(values)
    return GradientSummary(
        n=int(values.size),
        n_nonfinite=int(raw.size - values.size),
        mean_abs=float(magnitude.mean()),
        std=std,
        log10_p1=float(p1),
        log10_median=float(p50),
        log10_p99=float(p99),
        orders_of_magnitude=float(p99 - p1),
        fraction_below_1e6=float(np.mean(magnitude < 1e-6)),
        fraction_zero=float(np.mean(magnitude == 0)),
        excess_kurtosis=kurtosis,
    )


# --------------------------------------------------------------------------------------------
# Records and their file format
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class GradientRecord:
    """Gradients recorded during one training run.

    grads:       `[snapshot, coord]` float32, the flattened agent gradient at each recorded update
    steps:       `[snapshot]` int64, the update (or environment step) index of each snapshot
    layer_ids:   `[coord]` int32, index into `layer_names` of the parameter each coordinate is in
    layer_names: names of the parameter arrays (e.g. "params/Dense_0/kernel")
    updates:     `[snapshot, coord]` the optimizer's updates at the same steps, or None
    metadata:    JSON-serialisable dict: env, agent, optimizer, seed, ...
    """

    grads: np.ndarray
    steps: np.ndarray
    layer_ids: np.ndarray
    layer_names: tuple[str, ...] = ()
    updates: np.ndarray | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        grads = np.asarray(self.grads)
        if grads.ndim != 2:
            raise ValueError(f"grads must be [snapshot, coord], got shape {grads.shape}")
        n_snapshots, n_coords = grads.shape
        steps = np.asarray(self.steps, dtype=np.int64).reshape(-1)
        if steps.shape != (n_snapshots,):
            raise ValueError(f"steps must have {n_snapshots} entries, got {steps.size}")
        layer_ids = np.asarray(self.layer_ids, dtype=np.int32).reshape(-1)
        if layer_ids.shape != (n_coords,):
            raise ValueError(f"layer_ids must have {n_coords} entries, got {layer_ids.size}")
        layer_names = tuple(str(name) for name in self.layer_names)
        if layer_names and layer_ids.size and not 0 <= layer_ids.min() <= layer_ids.max() < len(
            layer_names
        ):
            raise ValueError("layer_ids must index layer_names")
        updates = None
        if self.updates is not None:
            updates = np.asarray(self.updates)
            if updates.shape != grads.shape:
                raise ValueError(
                    f"updates must have the shape of grads {grads.shape}, got {updates.shape}"
                )
        metadata = dict(self.metadata)
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata must be JSON-serialisable: {error}") from None
        object.__setattr__(self, "grads", grads)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "layer_ids", layer_ids)
        object.__setattr__(self, "layer_names", layer_names)
        object.__setattr__(self, "updates", updates)
        object.__setattr__(self, "metadata", metadata)

    @property
    def num_snapshots(self) -> int:
        return int(self.grads.shape[0])

    @property
    def num_coords(self) -> int:
        return int(self.grads.shape[1])

    def layer(self, name: str) -> np.ndarray:
        """`grads[:, coords of the named parameter array]`."""
        if name not in self.layer_names:
            raise ValueError(f"unknown layer {name!r}; known: {', '.join(self.layer_names)}")
        return self.grads[:, self.layer_ids == self.layer_names.index(name)]


def save_gradient_record(
    path: str | os.PathLike, record: GradientRecord | Mapping[str, Any]
) -> Path:
    """Write `record` as a compressed `.npz` (atomically: temporary file, then rename).

    `record` is a `GradientRecord` or a mapping of its fields. A path without the `.npz` suffix gets
    it appended (as NumPy does). Returns the path written.
    """
    if not isinstance(record, GradientRecord):
        record = GradientRecord(**dict(record))
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "grads": record.grads,
        "steps": record.steps,
        "layer_ids": record.layer_ids,
        "layer_names": np.asarray(record.layer_names, dtype=np.str_).reshape(-1),
        "metadata": np.asarray(json.dumps(record.metadata, sort_keys=True)),
        "format_version": np.asarray(FORMAT_VERSION),
    }
    if record.updates is not None:
        arrays["updates"] = record.updates
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(file, **arrays)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def load_gradient_record(path: str | os.PathLike) -> GradientRecord:
    """Read a record written by `save_gradient_record` (no pickles are loaded).

    Raises `Optim4RLError` (a ValueError) with one line for a missing, corrupt or foreign file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            missing = {"grads", "steps", "layer_ids", "metadata"} - names
            if missing:
                raise Optim4RLError(
                    f"{path}: not a gradient record (missing {', '.join(sorted(missing))})"
                )
            version = int(data["format_version"]) if "format_version" in names else 1
            if version > FORMAT_VERSION:
                raise Optim4RLError(
                    f"{path}: gradient record format {version} is newer than this optim4rl "
                    f"reads ({FORMAT_VERSION})"
                )
            return GradientRecord(
                grads=data["grads"],
                steps=data["steps"],
                layer_ids=data["layer_ids"],
                layer_names=tuple(data["layer_names"].tolist()) if "layer_names" in names else (),
                updates=data["updates"] if "updates" in names else None,
                metadata=json.loads(str(data["metadata"])),
            )
    except Optim4RLError:
        raise
    except FileNotFoundError:
        raise Optim4RLError(f"{path}: no such gradient record") from None
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise Optim4RLError(f"{path}: unreadable gradient record ({error})") from None


def flatten_tree(tree: Any) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Flatten a parameter-shaped pytree (e.g. a gradient) into one record row.

    Returns `(values[coord] float32, layer_ids[coord] int32, layer_names)`, leaves in
    `jax.tree_util` order, with names like `"params/Dense_0/kernel"`. Host-side: call it on
    gradients fetched from a jitted chunk, never inside jit.
    """
    import jax  # only this helper needs JAX

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError("flatten_tree got an empty pytree")
    names, values, ids = [], [], []
    for index, (key_path, leaf) in enumerate(leaves):
        names.append("/".join(_key_name(key) for key in key_path) or f"leaf_{index}")
        array = np.asarray(leaf, dtype=np.float32).reshape(-1)
        values.append(array)
        ids.append(np.full(array.size, index, dtype=np.int32))
    return np.concatenate(values), np.concatenate(ids), tuple(names)


def _key_name(key: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)
