"""Host-side driver for `optim4rl train`: seeds in parallel, jitted chunks, streamed metrics.

Data flow (STYLE.md): a `TrainSpec` (what to train) and an agent config (how) -> env + agent +
optimizer -> one jitted, seed-vmapped `run_chunk` called repeatedly -> rows in `metrics.csv`,
`summary.json`, a learning-curve plot and checkpoints in the run directory. Nothing here prints:
progress goes to an optional callback.
"""

from __future__ import annotations

import dataclasses
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
from optim4rl.runs import RunDir, load_checkpoint, read_csv, save_checkpoint

Callback = Callable[[dict[str, Any]], None]


def default_learning_rate(agent: str, env: str) -> float:
    """The step size a run gets when none is given: A2C 3e-3 (SPEC §4's best Adam step on the
    gridworlds); PPO the task's step size in SPEC §4's table (walker2d 3e-5), else 3e-4."""
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
    score_fraction: float = 0.1

    def __post_init__(self):
        if self.seeds < 1:
            raise ValueError("seeds must be at least 1")
        if self.learning_rate <= 0:
            raise ValueError("learning_rate must be positive")


def agent_module(agent: str):
    from optim4rl.agents import a2c, ppo

    modules = {"a2c": a2c, "ppo": ppo}
    if agent not in modules:
        raise ConfigError(f"unknown agent {agent!r}; known agents: a2c, ppo")
    return modules[agent]


def default_agent_config(agent: str, env: str, scale: str = "cpu", **overrides):
    """The paper's hyperparameters (SPEC §4) for `env`, at CPU or paper scale, with overrides."""
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


def prepare(spec: TrainSpec, agent_config: Any) -> PreparedRun:
    module = agent_module(spec.agent)
    probe = module.make_train(agent_config, make_tx(spec))
    per_chunk = _updates_per_chunk(probe.num_updates, spec.log_chunks)
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


def run(
    spec: TrainSpec,
    agent_config: Any,
    out: Path | str,
    callback: Callback | None = None,
    resume: bool = False,
    plot: bool = True,
    extra_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains `spec.seeds` seeds in parallel and writes the run directory; returns the summary."""
    run_dir = RunDir(out)
    prepared = prepare(spec, agent_config)
    train = prepared.train
    seed_ids = spec.seed + np.arange(spec.seeds)
    state = prepared.init_state()
    start_chunk, elapsed_before = 0, 0.0
    ckpt_path = run_dir.file("checkpoint.msgpack")
    if resume and ckpt_path.exists():
        state, meta = load_checkpoint(ckpt_path, state)
        start_chunk, elapsed_before = int(meta["chunk"]), float(meta.get("wall_time_s", 0.0))
        rows = [r for r in read_csv(run_dir.file("metrics.csv"))
                if r["update"] <= start_chunk * train.updates_per_chunk] if start_chunk else []
        writer = run_dir.metrics_writer()
        writer.write(rows)
    else:
        writer = run_dir.metrics_writer()
    # The config as asked for; the chunk size chosen for logging is recorded beside it.
    run_dir.write_config(
        run_config(spec, agent_config, extra_config),
        updates_per_chunk=train.updates_per_chunk,
        seeds=seed_ids.tolist(),
        devices=[str(d) for d in jax.devices()],
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
        if time.time() - last_ckpt > spec.checkpoint_every_s or done_chunks == num_chunks:
            save_checkpoint(ckpt_path, state, {
                "chunk": done_chunks, "wall_time_s": elapsed_before + time.time() - t_start})
            last_ckpt = time.time()
    wall_time = elapsed_before + time.time() - t_start

    if resume and start_chunk:
        all_rows = read_csv(run_dir.file("metrics.csv"))
        returns = _curves_from_rows(all_rows, seed_ids, "episode_return")
        env_steps = _curves_from_rows(all_rows, seed_ids, "env_steps")[0]
    else:
        returns = np.concatenate(history["episode_return"], axis=1) if history else np.zeros((spec.seeds, 0))
        env_steps = np.concatenate(history["env_steps"], axis=1)[0] if history else np.zeros(0)
    scores = score_of(returns, spec.score_fraction)
    total_steps = num_chunks * steps_per_chunk
    run_time = max(wall_time - (compile_s or 0.0), 1e-9)
    summary = {
        "env": spec.env, "agent": spec.agent, "optimizer": spec.optimizer,
        "learning_rate": spec.learning_rate, "seeds": seed_ids.tolist(),
        "score_per_seed": scores.tolist(), "score_mean": float(np.nanmean(scores)),
        "final_return_per_seed": returns[:, -1].tolist() if returns.size else [],
        "env_steps_per_seed": int(total_steps),
        "wall_time_s": wall_time, "compile_time_s": compile_s,
        "steps_per_s": total_steps * spec.seeds / run_time,
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
