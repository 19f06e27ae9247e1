"""Recording agent-gradients during ordinary training (docs/paper_settings.md §5.4), and the report built on them.

The paper's gradient analysis (Lan et al. 2023, Sec. 4) needs the gradients an agent actually sees
while it learns. Rather than instrument the trainers, :func:`recording` wraps the optimizer: it is
an optax transformation that passes every gradient to the inner one and, on every `every`-th
update, copies the gradient and the update it produced at a fixed subsample of coordinates into
buffers of its own state. All of it runs inside `jit` (a dynamic slice per snapshot), so any agent
(`a2c`, `ppo`, the supervised classifier of `optim4rl.analysis.supervised`) and any optimizer can be
recorded with the unchanged `make_train(cfg, recording(tx, ...))`; the buffers are read back from
the final optimizer state (:func:`find_recording_state`) into a `GradientRecord`.

The recorded gradient is the one the optimizer receives, i.e. before the optimizer's own clipping
(`make_optimizer(..., grad_clip=1)` clips inside `tx`); the recorded update is what `tx` returns
(`params ← params + update`).

:func:`analyze` turns records into the run directory's numbers (scale statistics per phase and
layer, drift between phases, optionally the identity experiment) and figures, and
:func:`report_markdown` into a short Markdown report. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim4rl.analysis import gradients
from optim4rl.errors import ConfigError

__all__ = [
    "CollectResult",
    "RecordingState",
    "analyze",
    "collect_rl",
    "compare_runs",
    "describe",
    "find_recording_state",
    "label_of",
    "load_records",
    "plan_snapshots",
    "record_from_state",
    "recording",
    "report_markdown",
    "run_recorded",
    "select_coordinates",
    "summarize_record",
    "write_run",
    "zero_free_windows",
]

Callback = Callable[[dict[str, Any]], None]


# --------------------------------------------------------------------------------------------
# The recording optimizer wrapper
# --------------------------------------------------------------------------------------------


class RecordingState(NamedTuple):
    """State of :func:`recording`: the inner optimizer's state plus the snapshot buffers."""

    inner: Any
    grads: jax.Array  # [num_snapshots, k] float32, gradient at the recorded coordinates
    updates: jax.Array  # [num_snapshots, k] float32, the inner optimizer's update there
    steps: jax.Array  # [num_snapshots] int32, update index of each snapshot (-1: not written)
    count: jax.Array  # int32, updates seen so far


def _leaf_slices(indices: np.ndarray, sizes: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """Splits sorted-or-not flat indices into `(leaf, local indices)` in the order given.

    The concatenation of `leaf.reshape(-1)[local]` over the result equals `flat[indices]` when
    `indices` are sorted (which :func:`recording` checks), so no full ravel is needed.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    leaf_of = np.searchsorted(offsets, indices, side="right") - 1
    return [(leaf, indices[leaf_of == leaf] - offsets[leaf]) for leaf in np.unique(leaf_of)]


def _gather(tree: Any, indices: np.ndarray) -> jax.Array:
    """`ravel_pytree(tree)[0][indices]` for sorted `indices`, gathering leaf by leaf (in jit)."""
    leaves = jax.tree_util.tree_leaves(tree)
    pieces = [
        jnp.reshape(leaves[leaf], (-1,))[local].astype(jnp.float32)
        for leaf, local in _leaf_slices(indices, [int(np.size(x)) for x in leaves])
    ]
    return jnp.concatenate(pieces)


def recording(
    tx: optax.GradientTransformation, indices: Any, every: int, num_snapshots: int
) -> optax.GradientTransformation:
    """Wrap `tx` so that its state records gradients and updates at fixed coordinates.

    `indices` are positions in the flattened parameter vector (`jax.flatten_util.ravel_pytree`
    order, i.e. `jax.tree_util` leaf order, each leaf row-major), e.g. from
    :func:`select_coordinates`. On update number `n` (0-based) with `n % every == 0` and
    `n // every < num_snapshots`, the gradient fed to `tx` and the update `tx` returns, at
    `indices`, are written to row `n // every` of the buffers, and `n` to `steps`. Updates are
    exactly those of `tx`. Works under `jit`/`vmap` (the buffers are part of the state).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise ValueError("recording needs at least one coordinate index")
    if np.any(np.diff(indices) <= 0) or indices[0] < 0:
        raise ValueError("recording indices must be non-negative, sorted and distinct")
    if every < 1 or num_snapshots < 1:
        raise ValueError(f"every and num_snapshots must be positive, got {every}, {num_snapshots}")
    k = int(indices.size)

    def init(params):
        total = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
        if indices[-1] >= total:
            raise ValueError(
                f"recording index {int(indices[-1])} is outside the {total} parameters"
            )
        return RecordingState(
            inner=tx.init(params),
            grads=jnp.zeros((num_snapshots, k), jnp.float32),
            updates=jnp.zeros((num_snapshots, k), jnp.float32),
            steps=jnp.full((num_snapshots,), -1, jnp.int32),
            count=jnp.zeros((), jnp.int32),
        )

    def update(grads, state, params=None):
        updates, inner = tx.update(grads, state.inner, params)
        slot = state.count // every
        write = (state.count % every == 0) & (slot < num_snapshots)
        slot = jnp.minimum(slot, num_snapshots - 1)

        def put(buffer, row):
            # Only one row is touched: a select on that row, not on the whole buffer.
            old = jax.lax.dynamic_index_in_dim(buffer, slot, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(buffer, jnp.where(write, row, old), slot, 0)

        new_state = RecordingState(
            inner=inner,
            grads=put(state.grads, _gather(grads, indices)),
            updates=put(state.updates, _gather(updates, indices)),
            steps=put(state.steps, state.count),
            count=state.count + 1,
        )
        return updates, new_state

    return optax.GradientTransformation(init, update)


def find_recording_state(tree: Any) -> RecordingState:
    """The (single) `RecordingState` inside a train state or optimizer state pytree."""
    found = [
        leaf
        for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, RecordingState))
        if isinstance(leaf, RecordingState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one RecordingState in the state, found {len(found)}")
    return found[0]


def select_coordinates(
    params: Any, num_coords: int, seed: int = 0, min_per_layer: int = 32
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Choose about `num_coords` flat parameter positions, stratified by layer.

    Every parameter array gets `min(size, min_per_layer)` coordinates; the rest of the budget is
    shared in proportion to the arrays' sizes, so the pooled sample stays close to the whole
    network's distribution while no layer (e.g. a bias) is missed. Returns sorted flat `indices`,
    the `layer_ids` of those indices and the `layer_names` (as in `gradients.flatten_tree`).
    `params` may hold arrays or `jax.ShapeDtypeStruct`s. All coordinates are taken when
    `num_coords` reaches the parameter count.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("select_coordinates got an empty pytree")
    names = tuple(
        "/".join(gradients._key_name(key) for key in path) or f"leaf_{i}"
        for i, (path, _) in enumerate(leaves)
    )
    sizes = np.array([int(np.prod(leaf.shape)) for _, leaf in leaves], dtype=np.int64)
    total = int(sizes.sum())
    if num_coords < 1:
        raise ValueError(f"num_coords must be positive, got {num_coords}")
    if num_coords >= total:
        quota = sizes.copy()
    else:
        quota = np.minimum(sizes, min(min_per_layer, num_coords // len(sizes)))
        left = num_coords - int(quota.sum())
        room = sizes - quota
        # Largest-remainder apportionment of what is left, in proportion to the sizes.
        share = left * room / max(int(room.sum()), 1)
        extra = np.floor(share).astype(np.int64)
        order = np.argsort(-(share - extra), kind="stable")
        extra[order[: left - int(extra.sum())]] += 1
        quota += np.minimum(extra, room)
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    chosen, ids = [], []
    for leaf, (size, count) in enumerate(zip(sizes, quota)):
        local = np.sort(rng.choice(int(size), size=int(count), replace=False))
        chosen.append(offsets[leaf] + local)
        ids.append(np.full(int(count), leaf, dtype=np.int32))
    return np.concatenate(chosen).astype(np.int64), np.concatenate(ids), names


def plan_snapshots(total_updates: int, num_snapshots: int) -> tuple[int, int]:
    """`(every, buffer rows)` so that about `num_snapshots` evenly spaced updates are recorded,
    the first and (nearly) the last included."""
    if total_updates < 1 or num_snapshots < 1:
        raise ValueError("total_updates and num_snapshots must be positive")
    every = math.ceil(total_updates / num_snapshots)
    return every, math.ceil(total_updates / every)


def record_from_state(
    state: RecordingState,
    layer_ids: Any,
    layer_names: Sequence[str],
    metadata: Mapping[str, Any] | None = None,
) -> gradients.GradientRecord:
    """A `GradientRecord` from one (unbatched) recording state; unwritten rows are dropped."""
    steps = np.asarray(jax.device_get(state.steps))
    if steps.ndim != 1:
        raise ValueError("record_from_state needs the state of one run (index the seed axis first)")
    written = steps >= 0
    return gradients.GradientRecord(
        grads=np.asarray(jax.device_get(state.grads))[written],
        updates=np.asarray(jax.device_get(state.updates))[written],
        steps=steps[written],
        layer_ids=layer_ids,
        layer_names=tuple(layer_names),
        metadata=dict(metadata or {}),
    )


# --------------------------------------------------------------------------------------------
# Running a trainer with a recording optimizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CollectResult:
    """A recorded run: the gradients, the training metrics per update, the final state."""

    record: gradients.GradientRecord
    metrics: dict[str, np.ndarray]
    config: Any
    state: Any
    wall_time_s: float


def run_recorded(
    make_train: Callable[[optax.GradientTransformation], Any],
    tx: optax.GradientTransformation,
    key: jax.Array,
    optimizer_steps_per_update: int,
    num_coords: int,
    num_snapshots: int,
    metadata: Mapping[str, Any],
    coord_seed: int = 0,
    callback: Callback | None = None,
    progress_key: str = "env_steps",
) -> CollectResult:
    """Train `make_train(recording(tx, ...))` for one seed, chunk by chunk, and collect the record.

    `make_train(tx)` returns a trainer with the `init`/`run_chunk`/`num_chunks`/`num_updates`
    shape of `optim4rl.agents.types.Trainer`; `optimizer_steps_per_update` is how many times one
    trainer update calls `tx.update` (1 for A2C; epochs × minibatches for PPO). After every chunk
    `callback` gets `{chunk, num_chunks, done, total, <progress_key>, episode_return | loss}`, with
    `done`/`total` in samples (environment steps or examples; `total_steps` too for env steps).
    """
    probe = make_train(tx)
    shapes = jax.eval_shape(probe.init, key).params
    indices, layer_ids, layer_names = select_coordinates(shapes, num_coords, coord_seed)
    optimizer_steps = probe.num_updates * optimizer_steps_per_update
    every, rows = plan_snapshots(optimizer_steps, num_snapshots)
    train = make_train(recording(tx, indices, every, rows))
    start = time.time()
    state = jax.jit(train.init)(key)
    run_chunk = jax.jit(train.run_chunk, donate_argnums=0)
    history: dict[str, list[np.ndarray]] = {}
    per_chunk = train.steps_per_update * train.updates_per_chunk
    for chunk in range(train.num_chunks):
        state, metrics = run_chunk(state)
        metrics = jax.device_get(metrics)
        for name, value in metrics.items():
            history.setdefault(name, []).append(np.asarray(value))
        if callback is not None:
            done, total = (chunk + 1) * per_chunk, train.num_chunks * per_chunk
            event = {"chunk": chunk + 1, "num_chunks": train.num_chunks, "done": done,
                     "total": total, progress_key: done}
            if progress_key == "env_steps":
                event["total_steps"] = total
            for name in ("episode_return", "loss"):
                if name in metrics:
                    event[name] = float(np.nanmean(metrics[name][-1]))
                    break
            callback(event)
    wall = time.time() - start
    metrics = {name: np.concatenate(values) for name, values in history.items()}
    info = {
        **metadata,
        "num_coords": int(indices.size),
        "num_parameters": int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))),
        "record_every": every,
        "step_unit": "optimizer step",
        "optimizer_steps": optimizer_steps,
        "optimizer_steps_per_update": optimizer_steps_per_update,
        "samples_per_update": train.steps_per_update,
        "coord_seed": coord_seed,
    }
    record = record_from_state(find_recording_state(state), layer_ids, layer_names, info)
    return CollectResult(record, metrics, getattr(train, "cfg", None), state, wall)


def collect_rl(
    agent: str,
    env: str,
    optimizer: str = "adam",
    learning_rate: float = 3e-3,
    grad_clip: float | None = 1.0,
    total_steps: int | None = None,
    seed: int = 0,
    num_coords: int = 2048,
    num_snapshots: int = 150,
    agent_overrides: Mapping[str, Any] | None = None,
    scale: str = "cpu",
    callback: Callback | None = None,
) -> CollectResult:
    """Train one `agent` (`"a2c"`/`"ppo"`) on `env` with `optimizer` and record its gradients.

    The agent's settings are the CPU (or `scale="paper"`) preset of `optim4rl train`, with
    `agent_overrides` and `total_steps` applied. The optimizer is `make_optimizer(optimizer,
    learning_rate, grad_clip)`; the recorded gradient is the one before its clip.
    """
    from optim4rl import training

    spec = training.TrainSpec(agent=agent, env=env, optimizer=optimizer, learning_rate=learning_rate,
                              grad_clip=grad_clip, seeds=1, seed=seed)
    overrides = dict(agent_overrides or {})
    if total_steps is not None:
        overrides["total_steps"] = total_steps
    cfg = training.resolve_agent_config(spec, overrides, scale=scale)
    module = training.agent_module(agent)
    steps_per_update = 1
    if agent == "ppo":
        steps_per_update = cfg.num_updates_per_batch * cfg.num_minibatches
    metadata = {
        "kind": "rl", "agent": agent, "env": env, "optimizer": optimizer,
        "learning_rate": learning_rate, "grad_clip": grad_clip, "seed": seed,
        "num_envs": cfg.num_envs, "total_env_steps": None,
    }
    result = run_recorded(
        lambda tx: module.make_train(cfg, tx), training.make_tx(spec), jax.random.key(seed),
        steps_per_update, num_coords, num_snapshots, metadata, coord_seed=seed, callback=callback,
    )
    record = result.record
    meta = dict(record.metadata)
    meta["total_env_steps"] = int(meta["optimizer_steps"] // steps_per_update * meta["samples_per_update"])
    meta["agent_config"] = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    returns = result.metrics["episode_return"]
    tail = returns[-max(1, returns.size // 10):]
    tail = tail[np.isfinite(tail)]
    meta["final_episode_return"] = float(tail.mean()) if tail.size else None
    result.record = dataclasses.replace(record, metadata=meta)
    return result


# --------------------------------------------------------------------------------------------
# Analysis and report
# --------------------------------------------------------------------------------------------


def label_of(record: gradients.GradientRecord, with_optimizer: bool = False) -> str:
    """A short figure label from a record's metadata: "A2C big_dense_long", "MLP digits"
    (with the optimizer in brackets when `with_optimizer`)."""
    meta = record.metadata
    if meta.get("kind") == "supervised":
        label = f"MLP {meta.get('dataset', '?')}"
    else:
        label = f"{str(meta.get('agent', '?')).upper()} {meta.get('env', '?')}"
    return f"{label} ({meta.get('optimizer', '?')})" if with_optimizer else label


def _stats(values: Any) -> dict[str, Any]:
    return gradients.summary_stats(values)._asdict()


def summarize_record(record: gradients.GradientRecord, n_phases: int = 3) -> dict[str, Any]:
    """Scale statistics overall, per phase and per layer, and the drift between phases."""
    phases = gradients.split_phases(record.grads, n_phases)
    names = list(phases)
    drift, drift_nonzero = {}, {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = phases[names[i]], phases[names[j]]
            pair = f"{names[i]}-{names[j]}"
            drift[pair] = gradients.drift(a, b)._asdict()
            if np.any(a != 0) and np.any(b != 0):
                drift_nonzero[pair] = gradients.drift(a[a != 0], b[b != 0])._asdict()
    steps = np.array_split(record.steps, n_phases)
    summary = {
        "num_snapshots": record.num_snapshots,
        "num_coords": record.num_coords,
        "gradient": _stats(record.grads),
        # Exact zeros are structural (inputs that are never on, inactive ReLUs) and sit at the
        # log10(eps) floor; the spread of the non-zero gradients is the scale problem proper.
        "gradient_nonzero": _stats(record.grads[record.grads != 0]),
        "fraction_coords_always_zero": float(np.mean(np.all(record.grads == 0, axis=0))),
        "phases": {
            name: {"first_step": int(s[0]), "last_step": int(s[-1]), **_stats(values),
                   "nonzero": _stats(values[values != 0])}
            for (name, values), s in zip(phases.items(), steps)
        },
        # Wasserstein-1 / KS of log10(|g| + 1e-8) between phases, over all g (exact zeros at the
        # -8 floor included) and over the non-zero g only.
        "drift": drift,
        "drift_nonzero": drift_nonzero,
        "layers": {
            name: {"num_coords": int(np.sum(record.layer_ids == index)),
                   **_stats(record.grads[:, record.layer_ids == index])}
            for index, name in enumerate(record.layer_names)
        },
    }
    if record.updates is not None:
        summary["update"] = _stats(record.updates)
    return summary


def zero_free_windows(grads: Any, seq_len: int = 5) -> np.ndarray:
    """`[seq_len, window]`: the non-overlapping windows of `seq_len` consecutive snapshots of
    each coordinate (as the identity experiment cuts them) that contain no exact zero.

    Passed to `identity_experiment`, each window is one "coordinate" of length `seq_len`, so the
    networks are scored on non-zero gradients only (windows of one coordinate may fall on both
    sides of its train/test split).
    """
    values = np.asarray(grads, dtype=np.float32)
    usable = values.shape[0] // seq_len * seq_len
    windows = values[:usable].T.reshape(values.shape[1], -1, seq_len).reshape(-1, seq_len)
    return windows[np.all(windows != 0, axis=1) & np.all(np.isfinite(windows), axis=1)].T


def _identity(record: gradients.GradientRecord, steps: int, seed: int) -> dict[str, Any]:
    """The identity experiment on all recorded coordinates and on the zero-free windows.

    Exact zeros are reproduced exactly by the processed network (`sign(0) = 0`) and never by the
    raw one, so with many zeros (sparse RL inputs, inactive ReLUs) the score on all coordinates
    mostly counts zeros; the zero-free score measures the scale problem itself.
    """
    from optim4rl.analysis import identity

    results = {}
    for name, values in (("all", record.grads), ("zero_free", zero_free_windows(record.grads))):
        if values.shape[0] == 0 or values.shape[1] < 2:
            continue
        result = identity.identity_experiment(values, steps=steps, seed=seed)
        results[name] = {
            "raw": result["raw"],
            "processed": result["processed"],
            "raw_final_train_accuracy": float(result["raw_train_accuracy"][-1]),
            "processed_final_train_accuracy": float(result["processed_train_accuracy"][-1]),
            "n_train_windows": result["n_train_windows"],
            "n_test_windows": result["n_test_windows"],
            "seq_len": result["seq_len"],
            "steps": result["steps"],
            "tolerance": 0.1,
        }
    results["fraction_zero"] = float(np.mean(record.grads == 0))
    return results


def analyze(
    records: Mapping[str, gradients.GradientRecord],
    out: str | Path,
    n_phases: int = 3,
    identity_steps: int = 0,
    identity_on: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Statistics, drift and figures for one or more records; returns the summary (not written).

    Writes `gradient_histograms.png` (histograms of g and of log10|g| by phase, one row per
    record) and `gradient_drift.png` (Wasserstein drift between phases, one panel per record) in
    `out`, and both again over the non-zero gradients (`*_nonzero.png`). With `identity_steps > 0` the identity experiment runs on the records named in
    `identity_on` (default: all) for that many training steps, on all recorded coordinates and
    on the zero-free windows (see `_identity`).
    """
    from optim4rl.analysis import plots

    if not records:
        raise ValueError("analyze needs at least one gradient record")
    for label, record in records.items():
        if record.num_snapshots < max(n_phases, 2):
            raise ConfigError(
                f"{label}: {record.num_snapshots} snapshot(s) cannot be split into {n_phases} "
                "training phases; train for more updates or record more snapshots")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"n_phases": n_phases, "phase_names": gradients.phase_names(n_phases),
                               "records": {}}
    for label, record in records.items():
        summary["records"][label] = {"metadata": dict(record.metadata),
                                     **summarize_record(record, n_phases)}
    if identity_steps > 0:
        for label in records if identity_on is None else identity_on:
            summary["records"][label]["identity"] = _identity(records[label], identity_steps, seed)
    plots.plot_gradient_histograms(
        records, out / "gradient_histograms.png", n_phases,
        title="gradient distributions by training phase",
    )
    plots.plot_drift(records, out / "gradient_drift.png", n_phases)
    # The same figures without the exact zeros, which pile up at log10(1e-8) and hide the spread
    # of the rest; the plots drop non-finite values, so zeros become NaN.
    nonzero = {label: np.where(r.grads != 0, r.grads, np.nan) for label, r in records.items()}
    plots.plot_gradient_histograms(
        nonzero, out / "gradient_histograms_nonzero.png", n_phases,
        title="gradient distributions by training phase, exact zeros left out",
    )
    plots.plot_drift(nonzero, out / "gradient_drift_nonzero.png", n_phases,
                     title="drift between training phases, exact zeros left out")
    summary["figures"] = ["gradient_histograms.png", "gradient_drift.png",
                          "gradient_histograms_nonzero.png", "gradient_drift_nonzero.png"]
    return summary


def describe(meta: Mapping[str, Any]) -> str:
    """One line on how a record was made, from its metadata."""
    every = (f"one optimizer step in {meta.get('record_every')} recorded, at "
             f"{meta.get('num_coords')} of {meta.get('num_parameters')} parameters")
    if meta.get("kind") == "supervised":
        return (f"{meta.get('model')} classifier, {meta.get('optimizer')} lr {meta.get('learning_rate')}, "
                f"{meta.get('optimizer_steps')} minibatch steps of {meta.get('batch_size')}, "
                f"seed {meta.get('seed')}; {every}; final test accuracy "
                f"{meta.get('test_accuracy', float('nan')):.3f}")
    final = meta.get("final_episode_return")
    final = "n/a" if final is None else f"{final:.3f}"
    return (f"{meta.get('optimizer')} lr {meta.get('learning_rate')} (clip {meta.get('grad_clip')}), "
            f"{meta.get('num_envs')} envs, {meta.get('total_env_steps')} env steps, seed "
            f"{meta.get('seed')}; {every}; episode return over the last 10% of updates {final}")


def report_markdown(summary: Mapping[str, Any]) -> str:
    """A Markdown report of `analyze`'s summary: scales, drift, identity-experiment accuracies."""
    lines: list[str] = ["Sources:", ""]
    for label, rec in summary["records"].items():
        lines.append(f"- **{label}**: {describe(rec['metadata'])}")
    lines += ["", "| source | snapshots × coords | g exactly 0 | coords 0 at every snapshot | "
              "log10\\|g\\| p1 / median / p99, g ≠ 0 | decades p1–p99, g ≠ 0 | "
              "decades p1–p99, all g | excess kurtosis |", "|---|---|---|---|---|---|---|---|"]
    records = summary["records"]
    for label, rec in records.items():
        g, nonzero = rec["gradient"], rec["gradient_nonzero"]
        lines.append(
            f"| {label} | {rec['num_snapshots']} × {rec['num_coords']} | "
            f"{g['fraction_zero']:.3f} | {rec['fraction_coords_always_zero']:.3f} | "
            f"{nonzero['log10_p1']:.2f} / {nonzero['log10_median']:.2f}"
            f" / {nonzero['log10_p99']:.2f} | {nonzero['orders_of_magnitude']:.2f} | "
            f"{g['orders_of_magnitude']:.2f} | {g['excess_kurtosis']:.1f} |"
        )
    lines += ["", "Drift between training phases: Wasserstein-1 distance of log10(|g| + 1e-8), in "
              "decades, over all g / over g ≠ 0 (KS statistics in brackets, same order):", ""]
    pairs = list(next(iter(records.values()))["drift"])
    lines.append("| source | " + " | ".join(pairs) + " |")
    lines.append("|---|" + "---|" * len(pairs))
    for label, rec in records.items():
        cells = []
        for pair in pairs:
            every, nonzero = rec["drift"][pair], rec["drift_nonzero"].get(pair)
            if nonzero is None:
                cells.append(f"{every['wasserstein']:.3f} / n/a ({every['ks_statistic']:.3f})")
            else:
                cells.append(f"{every['wasserstein']:.3f} / {nonzero['wasserstein']:.3f} "
                             f"({every['ks_statistic']:.3f} / {nonzero['ks_statistic']:.3f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    phase_names = summary["phase_names"]
    lines += ["", "By training phase: fraction of g exactly 0; median log10|g| of g ≠ 0; "
              "p1–p99 decades of g ≠ 0:", "",
              "| source | " + " | ".join(phase_names) + " |", "|---|" + "---|" * len(phase_names)]
    for label, rec in records.items():
        cells = []
        for phase in phase_names:
            stats = rec["phases"][phase]
            cells.append(f"{stats['fraction_zero']:.3f}; {stats['nonzero']['log10_median']:.2f}; "
                         f"{stats['nonzero']['orders_of_magnitude']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    with_identity = {label: rec["identity"] for label, rec in records.items() if "identity" in rec}
    if with_identity:
        lines += ["", "Identity experiment: fraction of held-out outputs within ±10% of the input "
                  "gradient, for a GRU fed raw g versus the processed [sign g, log|g|] (\"all\": "
                  "every recorded coordinate, exact zeros included, which only the processed "
                  "network reproduces; \"g ≠ 0\": the windows of 5 snapshots without an exact zero):",
                  "", "| gradients | coordinates | raw input | processed input | train / test windows "
                  "| training steps |", "|---|---|---|---|---|---|"]
        for label, result in with_identity.items():
            for name, title in (("all", f"all ({result['fraction_zero']:.0%} of g exactly 0)"),
                                ("zero_free", "g ≠ 0")):
                if name in result:
                    r = result[name]
                    lines.append(f"| {label} | {title} | {r['raw']:.3f} | {r['processed']:.3f} | "
                                 f"{r['n_train_windows']} / {r['n_test_windows']} | {r['steps']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------------

RECORD_FILE = "gradients.npz"


def write_run(
    result: CollectResult,
    out: str | Path,
    n_phases: int = 3,
    identity_steps: int = 0,
    config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a recorded run's directory; returns the summary.

    `out/gradients.npz` (the `GradientRecord`), `config.json`, `metrics.csv`/`.jsonl` (one row per
    trainer update), `summary.json` (scale statistics, drift per phase pair, identity experiment
    with `identity_steps > 0`), `report.md`, `gradient_histograms.png`, `gradient_drift.png` and,
    for RL, `learning_curve.png`.
    """
    from optim4rl.analysis import plots
    from optim4rl.runs import RunDir

    run_dir = RunDir(out)
    record = result.record
    run_dir.write_config({**dict(config or {}), "record": record.metadata})
    gradients.save_gradient_record(run_dir.file(RECORD_FILE), record)
    writer = run_dir.metrics_writer()
    names = [name for name, value in result.metrics.items() if np.ndim(value) == 1]
    length = len(result.metrics[names[0]]) if names else 0
    writer.write({"update": i + 1, **{name: float(result.metrics[name][i]) for name in names}}
                 for i in range(length))
    label = label_of(record)
    summary = analyze({label: record}, run_dir.path, n_phases, identity_steps, seed=int(
        record.metadata.get("seed", 0)))
    summary["wall_time_s"] = result.wall_time_s
    summary["record_file"] = RECORD_FILE
    returns = result.metrics.get("episode_return")
    if returns is not None and returns.size:
        plots.plot_learning_curves(
            {label: (result.metrics["env_steps"], returns)}, run_dir.file("learning_curve.png"),
            title=f"{label}: episode return while recording",
        )
    run_dir.write_summary(summary)
    run_dir.file("report.md").write_text(report_markdown(summary))
    return summary


def load_records(paths: Sequence[str | Path]) -> dict[str, gradients.GradientRecord]:
    """Records from run directories (their `gradients.npz`) or `.npz` files, keyed by label."""
    records: dict[str, gradients.GradientRecord] = {}
    for path in paths:
        path = Path(path)
        record = gradients.load_gradient_record(path / RECORD_FILE if path.is_dir() else path)
        label, n = label_of(record), 2
        if label in records:
            label = label_of(record, with_optimizer=True)
        base = label
        while label in records:
            label, n = f"{base} #{n}", n + 1
        records[label] = record
    if not records:
        raise ConfigError("--compare needs at least one run directory or .npz file")
    return records


def compare_runs(
    paths: Sequence[str | Path],
    out: str | Path,
    n_phases: int = 3,
    identity_steps: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """RL-versus-supervised comparison of recorded runs, in one directory; returns the summary.

    One histogram figure and one drift figure with a row/panel per record, `summary.json`,
    `report.md`, and (with `identity_steps > 0`) the identity experiment on every record.
    """
    from optim4rl.runs import RunDir

    records = load_records(paths)
    run_dir = RunDir(out)
    run_dir.write_config({"compare": [str(p) for p in paths], "n_phases": n_phases,
                          "identity_steps": identity_steps, "seed": seed})
    summary = analyze(records, run_dir.path, n_phases, identity_steps, seed=seed)
    summary["sources"] = {label: str(p) for label, p in zip(records, paths)}
    run_dir.write_summary(summary)
    run_dir.file("report.md").write_text(report_markdown(summary))
    return summary
