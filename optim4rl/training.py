"""Host-side driver for `optim4rl train`: seeds in parallel, jitted chunks, streamed metrics.

Data flow (STYLE.md): a `TrainSpec` (what to train) and an agent config (how) -> env + agent +
optimizer -> one jitted, seed-vmapped `run_chunk` called repeatedly -> rows in `metrics.csv`,
`summary.json`, a learning-curve plot and checkpoints in the run directory. Nothing here prints:
progress goes to an optional callback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl import config as config_lib
from optim4rl.errors import ConfigError
from optim4rl.optimizers.make import optimizer_source
from optim4rl.parallel import population_mesh, shard_population
from optim4rl.runs import RunDir, claim_run_dir, load_checkpoint, read_csv, save_checkpoint

Callback = Callable[[dict[str, Any]], None]


def default_learning_rate(agent: str, env: str) -> float:
    """The step size a run gets when none is given: A2C 3e-3 (docs/paper_settings.md §4's best Adam step on the
    gridworlds); PPO the task's step size in docs/paper_settings.md §4's table (walker2d 3e-5), else 3e-4."""
    if agent == "ppo":
        from optim4rl.agents.ppo import PAPER_LEARNING_RATES, _task_name

        return PAPER_LEARNING_RATES.get(_task_name(env), 3e-4)
    return 3e-3


@dataclass(frozen=True)
class TrainSpec:
    """What `optim4rl train` runs: an agent on an env with an optimizer, over several seeds."""

    agent: Literal["a2c", "ppo"] = "a2c"
    env: str = "catch"
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    grad_clip: float | None = 1.0
    global_clip: float | None = None
    seeds: int = 1
    seed: int = 0
    log_chunks: int = 50
    checkpoint_every_s: float = 120.0
    checkpoint_every_chunks: int = 10  # also checkpoint this often, so short runs survive a kill
    score_fraction: float = 0.1

    def __post_init__(self):
        try:
            config_lib.check_numbers(self)
        except ValueError as exc:
            raise ConfigError(f"train: {exc}") from None
        if not 1 <= self.seeds <= 65536:
            raise ConfigError(f"seeds must be between 1 and 65536, got {self.seeds}")
        if not 0 <= self.seed <= 2**31 - 1 - self.seeds:
            raise ConfigError(f"seed must be between 0 and 2**31 - 1 - seeds, got {self.seed}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        for name in ("grad_clip", "global_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive or off (None), got {value}")
        if not 0 < self.score_fraction <= 1:
            raise ConfigError(f"score_fraction must lie in (0, 1], got {self.score_fraction}")
        for name in ("log_chunks", "checkpoint_every_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.checkpoint_every_s > 0:
            raise ConfigError(f"checkpoint_every_s must be positive, got {self.checkpoint_every_s}")


def agent_module(agent: str):
    from optim4rl.agents import a2c, ppo

    modules = {"a2c": a2c, "ppo": ppo}
    if agent not in modules:
        raise ConfigError(f"unknown agent {agent!r}; known agents: a2c, ppo")
    return modules[agent]


def default_agent_config(agent: str, env: str, scale: str = "cpu", **overrides):
    """The paper's hyperparameters (docs/paper_settings.md §4) for `env`, at CPU or paper scale, with overrides."""
    module = agent_module(agent)
    cls = module.PPOConfig if agent == "ppo" else module.A2CConfig
    if scale not in ("cpu", "paper"):
        raise ConfigError(f"unknown scale {scale!r}; choose cpu or paper")
    factory = cls.paper if scale == "paper" else cls.cpu
    # Validate names and types strictly first (one clear line), then let the preset derive what
    # depends on the budget (e.g. PPO's evaluation chunks) from the overridden values.
    checked = config_lib.replace(factory(env), **overrides)
    given = {k: getattr(checked, k) for k in overrides}
    return factory(env, **given)


def resolve_agent_config(spec: TrainSpec, overrides: Mapping[str, Any] | None = None, scale: str = "cpu"):
    changes = {k: v for k, v in dict(overrides or {}).items() if k != "env"}
    return default_agent_config(spec.agent, spec.env, scale, **changes)


def make_tx(spec: TrainSpec):
    from optim4rl import make_optimizer

    return make_optimizer(
        spec.optimizer, learning_rate=spec.learning_rate, grad_clip=spec.grad_clip,
        global_clip=spec.global_clip,
    )


def _updates_per_chunk(num_updates: int, log_chunks: int) -> int:
    return max(1, -(-num_updates // max(1, log_chunks)))


@dataclass
class PreparedRun:
    """Everything needed to run chunks of one training job (built once, reused by compare)."""

    spec: TrainSpec
    agent_config: Any
    train: Any
    run_chunk: Any
    mesh: Any

    def init_state(self):
        keys = jax.random.split(jax.random.key(self.spec.seed), self.spec.seeds)
        state = jax.jit(jax.vmap(self.train.init))(keys)
        return shard_population(state, self.mesh)


def prepare(spec: TrainSpec, agent_config: Any, updates_per_chunk: int | None = None) -> PreparedRun:
    """Builds the jitted chunk function. ``updates_per_chunk`` (A2C) fixes the chunk size instead
    of deriving it from the budget: a run extended on --resume keeps its recorded chunks, so its
    checkpoint's chunk count still means the same number of updates."""
    module = agent_module(spec.agent)
    probe = module.make_train(agent_config, make_tx(spec))
    per_chunk = updates_per_chunk or _updates_per_chunk(probe.num_updates, spec.log_chunks)
    # PPO evaluates once per chunk: its config's own chunking sets the number of evaluations.
    if spec.agent != "ppo" and getattr(agent_config, "updates_per_chunk", None) != per_chunk:
        agent_config = dataclasses.replace(agent_config, updates_per_chunk=per_chunk)
    train = module.make_train(agent_config, make_tx(spec))
    mesh = population_mesh(spec.seeds)
    run_chunk = jax.jit(jax.vmap(train.run_chunk), donate_argnums=0)
    return PreparedRun(spec, agent_config, train, run_chunk, mesh)


def _rows(metrics: Mapping[str, np.ndarray], seed_ids: np.ndarray, first_update: int) -> list[dict]:
    names = [k for k in metrics if np.ndim(metrics[k]) == 2]
    n_seeds, n_updates = metrics[names[0]].shape
    rows = []
    for u in range(n_updates):
        for s in range(n_seeds):
            row = {"seed": int(seed_ids[s]), "update": first_update + u + 1}
            row.update({k: float(metrics[k][s, u]) for k in names})
            rows.append(row)
    return rows


def score_of(returns: np.ndarray, fraction: float) -> np.ndarray:
    """Per-seed score: mean of the last `fraction` of the logged returns (NaN-aware)."""
    returns = np.asarray(returns, np.float64)
    n = max(1, int(round(returns.shape[-1] * fraction)))
    tail = returns[..., -n:]
    with np.errstate(all="ignore"):
        return np.nanmean(np.where(np.isfinite(tail), tail, np.nan), axis=-1)


def run_config(spec: TrainSpec, agent_config: Any, extra_config: Mapping[str, Any] | None = None) -> dict:
    """What config.json records as the run's config (compare matches it to skip finished runs).

    A learned optimizer read from a file is recorded with the file's SHA-256, so replacing the
    file makes an old run directory stale instead of silently reused.
    """
    return {"train": spec, "agent": agent_config,
            "optimizer_source": optimizer_source(spec.optimizer), **(extra_config or {})}


# A resumed A2C run may be given a larger step budget (--steps): the updates so far are the same
# whatever the budget (nothing in A2C depends on it), so the run continues where it stopped.
# PPO's evaluation schedule and chunking are derived from the budget, so its budget is fixed.
EXTENDABLE = {"a2c": {"agent.total_steps": "--steps"}, "ppo": {}}
FIXED_ON_RESUME = {"ppo": {"agent.total_steps": "a PPO run's evaluation schedule and chunks are derived from "
                                                "its step budget; start a new --out for a longer run"}}


def claim(out: Path | str, spec: TrainSpec, agent_config: Any, *, resume: bool = False,
          overwrite: bool = False, extra_config: Mapping[str, Any] | None = None) -> str:
    """`runs.claim_run_dir` for a training run (an A2C run's step budget may grow on --resume)."""
    return claim_run_dir(out, run_config(spec, agent_config, extra_config), resume=resume, overwrite=overwrite,
                         extendable=EXTENDABLE.get(spec.agent), fixed=FIXED_ON_RESUME.get(spec.agent))


def for_resume(out: Path | str, prepared: "PreparedRun") -> tuple["PreparedRun", int | None]:
    """The prepared run that continues the checkpoint in `out`, and the step budget it extends
    (None unless --steps grew). An extended run keeps its recorded chunk size."""
    record = json.loads((Path(out) / "config.json").read_text())
    old_steps = record["config"]["agent"].get("total_steps")
    extended_from = record.get("extended_from_steps")
    if old_steps != prepared.agent_config.total_steps:
        extended_from = record.get("env_steps_per_seed", old_steps)
    per_chunk = record.get("updates_per_chunk")
    if extended_from is not None and per_chunk and per_chunk != prepared.train.updates_per_chunk:
        prepared = prepare(prepared.spec, prepared.agent_config, updates_per_chunk=int(per_chunk))
    return prepared, extended_from


def actual_steps(prepared: "PreparedRun") -> int:
    """Env steps per seed the run really takes: the budget rounded up to whole updates (and
    chunks), e.g. 200,000 asked -> 204,800 with 1,280 steps per update."""
    train = prepared.train
    return train.num_chunks * train.updates_per_chunk * train.steps_per_update


def run(
    spec: TrainSpec,
    agent_config: Any,
    out: Path | str,
    callback: Callback | None = None,
    resume: bool = False,
    plot: bool = True,
    extra_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    prepared: PreparedRun | None = None,
) -> dict[str, Any]:
    """Trains `spec.seeds` seeds in parallel and writes the run directory; returns the summary.

    A directory that already holds a finished run of the same config is reused (its summary is
    returned); one of another config is refused unless `overwrite` (see `runs.claim_run_dir`).
    `resume` continues the run from its checkpoint; the config must be the recorded one.
    """
    record = run_config(spec, agent_config, extra_config)
    mode = claim(out, spec, agent_config, resume=resume, overwrite=overwrite, extra_config=extra_config)
    if mode == "finished":
        return json.loads((Path(out) / "summary.json").read_text())
    prepared = prepared or prepare(spec, agent_config)
    extended_from = None
    if mode == "resume":
        prepared, extended_from = for_resume(out, prepared)
    run_dir = RunDir(out)
    train = prepared.train
    seed_ids = spec.seed + np.arange(spec.seeds)
    state = prepared.init_state()
    start_chunk, elapsed_before = 0, 0.0
    ckpt_path = run_dir.file("checkpoint.msgpack")
    if mode == "resume":
        state, meta = load_checkpoint(ckpt_path, state)
        start_chunk, elapsed_before = int(meta["chunk"]), float(meta.get("wall_time_s", 0.0))
        # Rows logged after the checkpoint are recomputed; a row torn by a kill or a full disk
        # is dropped with them, so a run is always resumable from its last checkpoint.
        rows = [r for r in read_csv(run_dir.file("metrics.csv"), tolerate_torn=True)
                if isinstance(r.get("update"), (int, float)) and r["update"] <= start_chunk * train.updates_per_chunk]
        writer = run_dir.metrics_writer()
        writer.write(rows)
    else:
        writer = run_dir.metrics_writer()
    # The config as asked for; the chunk size chosen for logging is recorded beside it.
    run_dir.write_config(
        record,
        updates_per_chunk=train.updates_per_chunk,
        env_steps_per_seed=actual_steps(prepared),
        seeds=seed_ids.tolist(),
        devices=[str(d) for d in jax.devices()],
        **({"extended_from_steps": extended_from} if extended_from is not None else {}),
    )

    history: dict[str, list[np.ndarray]] = {}
    t_start = time.time()
    compile_s = None
    last_ckpt = time.time()
    num_chunks = train.num_chunks
    steps_per_chunk = train.steps_per_update * train.updates_per_chunk
    for chunk in range(start_chunk, num_chunks):
        t0 = time.time()
        state, metrics = prepared.run_chunk(state)
        metrics = jax.device_get(metrics)
        if compile_s is None:
            compile_s = time.time() - t0
        writer.write(_rows(metrics, seed_ids, chunk * train.updates_per_chunk))
        for k, v in metrics.items():
            history.setdefault(k, []).append(np.asarray(v))
        done_chunks = chunk + 1
        if callback is not None:
            wall = time.time() - t_start
            timed_chunks = done_chunks - start_chunk - 1
            sps = (timed_chunks * steps_per_chunk * spec.seeds / max(wall - compile_s, 1e-9)
                   if timed_chunks > 0 else float("nan"))
            callback({
                "chunk": done_chunks, "num_chunks": num_chunks,
                "env_steps": done_chunks * steps_per_chunk, "total_steps": num_chunks * steps_per_chunk,
                "steps_per_s": sps, "episode_return": _nanmean(metrics["episode_return"][:, -1]),
            })
        if (time.time() - last_ckpt > spec.checkpoint_every_s or done_chunks == num_chunks
                or (done_chunks - start_chunk) % spec.checkpoint_every_chunks == 0):
            save_checkpoint(ckpt_path, state, {
                "chunk": done_chunks, "wall_time_s": elapsed_before + time.time() - t_start})
            last_ckpt = time.time()
    wall_time = elapsed_before + time.time() - t_start

    if start_chunk:
        all_rows = read_csv(run_dir.file("metrics.csv"))
        returns = _curves_from_rows(all_rows, seed_ids, "episode_return")
        env_steps = _curves_from_rows(all_rows, seed_ids, "env_steps")[0]
        losses = _curves_from_rows(all_rows, seed_ids, "loss")
    else:
        returns = np.concatenate(history["episode_return"], axis=1) if history else np.zeros((spec.seeds, 0))
        env_steps = np.concatenate(history["env_steps"], axis=1)[0] if history else np.zeros(0)
        losses = np.concatenate(history["loss"], axis=1) if history else np.zeros((spec.seeds, 0))
    diverged = divergence(losses, _finite_params(state), seed_ids)
    scores = score_of(returns, spec.score_fraction)
    valid = np.ones(spec.seeds, bool)
    for d in diverged:
        valid[int(d["seed"] - spec.seed)] = False
    scores = np.where(valid, scores, np.nan)  # a diverged seed has no score, never a real-looking one
    total_steps = num_chunks * steps_per_chunk
    run_time = max(wall_time - (compile_s or 0.0), 1e-9)
    summary = {
        "env": spec.env, "agent": spec.agent, "optimizer": spec.optimizer,
        "learning_rate": spec.learning_rate, "seeds": seed_ids.tolist(),
        "score_per_seed": scores.tolist(),
        "score_mean": float(np.nanmean(scores)) if valid.any() and np.isfinite(scores).any() else None,
        "score_fraction": spec.score_fraction,
        "valid_per_seed": valid.tolist(), "diverged_seeds": diverged,
        "final_return_per_seed": returns[:, -1].tolist() if returns.size else [],
        "env_steps_per_seed": int(total_steps),
        **({"extended_from_steps": extended_from} if extended_from is not None else {}),
        "wall_time_s": wall_time, "compile_time_s": compile_s,
        # A resumed run: wall_time_s adds the earlier attempts up to their last checkpoint (work
        # after it was redone and is not counted twice); this attempt alone is reported too.
        "wall_time_this_attempt_s": time.time() - t_start, "resumed_at_chunk": start_chunk or None,
        "steps_per_s": total_steps * spec.seeds / run_time,
        "steps_per_s_note": "after compilation (wall time less the first chunk's compile time)",
        "score": f"mean of the last {spec.score_fraction:.0%} of logged episode returns",
    }
    if "eval_return" in history:
        evals = np.concatenate(history["eval_return"], axis=1)
        summary["eval_score_per_seed"] = score_of_evals(evals).tolist()
    run_dir.write_summary(summary)
    if plot and returns.size:
        from optim4rl.analysis import plots

        label = f"{spec.optimizer} (lr {spec.learning_rate:g})"
        plots.plot_learning_curves(
            {label: (env_steps, returns)}, run_dir.file("learning_curve.png"),
            title=f"{spec.agent.upper()} on {spec.env}: episode return over {spec.seeds} seed(s)",
        )
    return summary


def divergence(losses: np.ndarray, params_finite: np.ndarray, seed_ids: np.ndarray) -> list[dict]:
    """Seeds whose loss became non-finite (NaN or inf) or whose parameters ended non-finite,
    each with the first update (1-based) at which it happened (None: only the end state)."""
    diverged = []
    losses = np.asarray(losses, np.float64)
    for i, seed in enumerate(seed_ids):
        bad = np.flatnonzero(~np.isfinite(losses[i])) if losses.size else np.zeros(0, int)
        if bad.size or not params_finite[i]:
            diverged.append({"seed": int(seed),
                             "first_nonfinite_update": int(bad[0]) + 1 if bad.size else None})
    return diverged


def _finite_params(state) -> np.ndarray:
    """Per seed: are all the agent's parameters finite? (Leading axis of every leaf: the seed.)"""
    leaves = [x for x in jax.tree.leaves(state.params) if jnp.issubdtype(x.dtype, jnp.floating)]
    per_seed = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
    return np.asarray(jax.device_get(jnp.all(jnp.stack(per_seed), axis=0)))


def check_memory(prepared: "PreparedRun", fraction: float = 0.8) -> None:
    """Refuses, with one line, a run whose state alone would not fit in memory (a typo such as
    --seeds 100000), instead of failing deep inside the allocator or swapping for hours."""
    spec, cfg = prepared.spec, prepared.agent_config
    per_seed = jax.eval_shape(prepared.train.init, jax.random.key(0))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(per_seed))
    obs_size = int(np.prod(getattr(prepared.train.env, "observation_shape", (1,))))
    rollout = getattr(cfg, "rollout_length", None) or getattr(cfg, "unroll_length", 1) * getattr(
        cfg, "batch_size", 1) * getattr(cfg, "num_minibatches", 1)
    trajectory_bytes = getattr(cfg, "num_envs", 1) * rollout * (obs_size + 8) * 4 * 4
    need = spec.seeds * (2 * state_bytes + trajectory_bytes)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if jax.default_backend() == "cpu" and need > fraction * available:
        raise ConfigError(f"this run needs about {need / 2**30:,.1f} GiB for {spec.seeds} seed(s) "
                          f"({cfg.num_envs if hasattr(cfg, 'num_envs') else '?'} envs each) but "
                          f"{available / 2**30:,.1f} GiB are free; use fewer seeds or envs")


def score_of_evals(evals: np.ndarray, last: int = 3) -> np.ndarray:
    """Brax-style score: mean of the last `last` evaluations per seed (NaN = no evaluation)."""
    out = []
    for row in np.asarray(evals, np.float64):
        vals = row[np.isfinite(row)]
        out.append(vals[-last:].mean() if vals.size else np.nan)
    return np.asarray(out)


def _curves_from_rows(rows: list[dict], seed_ids: np.ndarray, key: str) -> np.ndarray:
    by_seed = {int(s): [] for s in seed_ids}
    for r in rows:
        by_seed.setdefault(int(r["seed"]), []).append((r["update"], r[key]))
    curves = [np.asarray([v for _, v in sorted(by_seed[int(s)])]) for s in seed_ids]
    length = min(len(c) for c in curves)
    return np.stack([c[:length] for c in curves])


def _nanmean(values) -> float:
    """Mean of the finite entries; NaN (without numpy's warning) when no episode has ended yet."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")
