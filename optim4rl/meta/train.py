"""Host-side driver of `optim4rl meta-train`: chunks, logging, evaluation, checkpoints, resume.

The jitted chunk (`MetaTrainer.run_chunk`) holds all the work; between chunks the host writes
metrics, evaluates the current φ now and then by training a fresh agent with it, and writes an
atomic checkpoint every `checkpoint_every_s` seconds. A resumed run continues from the last
checkpoint's exact state (keys included), so it ends with the same φ as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.meta.config import MetaConfig
from optim4rl.meta.pipeline import MetaState, MetaTrainer
from optim4rl.parallel import population_mesh, replicate, shard_population
from optim4rl.errors import Optim4RLError
from optim4rl.runs import RunDir, claim_run_dir, load_checkpoint, read_csv, save_checkpoint

Callback = Callable[[dict[str, Any]], None]


def place(state: MetaState, trainer: MetaTrainer) -> MetaState:
    """Shards every task's population over the devices; φ and the meta-optimizer are replicated."""
    pops = []
    for pop, setup in zip(state.populations, trainer.tasks):
        pops.append(shard_population(pop, population_mesh(len(setup.offsets))))
    mesh = population_mesh(len(trainer.tasks[0].offsets))
    return state._replace(
        phi=replicate(state.phi, mesh), meta_opt_state=replicate(state.meta_opt_state, mesh),
        populations=tuple(pops),
    )


class Evaluator:
    """Trains a fresh agent with a given φ (φ is a jit argument: compiled once).

    A2C: the task's CPU A2C settings for `eval_steps`, scored by the mean training return of the
    last 10% of updates. PPO: the task's meta-training PPO settings for `eval_steps`, scored by
    the deterministic-policy evaluation at the end (`num_eval_envs` episodes).
    """

    def __init__(self, trainer: MetaTrainer, task_index: int = 0):
        from optim4rl.agents import a2c

        cfg = trainer.cfg
        setup = trainer.tasks[task_index]
        self.task = setup.task
        if setup.trainer is not None:
            self._init_ppo(trainer, setup)
            return
        agent_cfg = a2c.A2CConfig.cpu(setup.task.env)
        changes = {"total_steps": cfg.eval_steps}
        if cfg.eval_num_envs:
            changes["num_envs"] = cfg.eval_num_envs
        self.agent_cfg = dataclasses.replace(agent_cfg, **changes)
        opt, lr, clip = trainer.opt, setup.task.learning_rate, cfg.grad_clip or None

        def evaluate(phi, key):
            train = a2c.make_train(self.agent_cfg, opt.transform(phi, learning_rate=lr, grad_clip=clip))
            _, metrics = train(key)
            return metrics["episode_return"]

        self._evaluate = jax.jit(evaluate)

    def _init_ppo(self, trainer: MetaTrainer, setup) -> None:
        from optim4rl.agents import ppo

        self.agent_cfg = trainer.cfg.ppo_eval_config(setup.task)
        opt, lr, clip = trainer.opt, setup.task.learning_rate, trainer.cfg.grad_clip or None

        def evaluate(phi, key):
            train = ppo.make_train(self.agent_cfg, opt.transform(phi, learning_rate=lr, grad_clip=clip),
                                   env=setup.env)
            _, metrics = train(key)
            return metrics["eval_return"][-1:]

        self._evaluate = jax.jit(evaluate)

    def __call__(self, phi, key) -> float:
        returns = np.asarray(self._evaluate(phi, key))
        tail = returns[-max(1, len(returns) // 10):]
        return float(np.nanmean(tail)) if np.isfinite(tail).any() else float("nan")


def memory_estimate(trainer: MetaTrainer) -> int:
    """Bytes a meta-iteration needs, roughly and from below: the meta state twice (the chunk's
    input and output), per agent each inner update's carry and rollout, and the optimizer's
    residuals for the backward pass (`MetaTrainer.remat_estimate_bytes` for all K updates without
    remat, one update's worth with it). Only for refusing runs that cannot fit, e.g. a typo in
    num_agents, before anything is allocated."""
    cfg = trainer.cfg
    state = jax.eval_shape(trainer.init)
    need = 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    for pop, setup in zip(state.populations, trainer.tasks):
        agents = len(setup.offsets)
        carry = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(pop)) // agents
        obs = int(np.prod(setup.env.observation_shape))
        rollout = cfg.envs_per_agent * cfg.rollout_length * (obs + 8) * 4
        need += agents * (cfg.inner_updates + 1) * (carry + rollout)
    residuals = trainer.remat_estimate_bytes
    need += residuals if trainer.remat == "none" else residuals // max(1, cfg.inner_updates)
    return int(need)


def check_memory(trainer: MetaTrainer, fraction: float = 0.8) -> None:
    """Refuses, with one line, a meta-training run that cannot fit in this machine's memory."""
    import os

    need = memory_estimate(trainer)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if jax.default_backend() == "cpu" and need > fraction * available:
        agents = ", ".join(str(len(s.offsets)) for s in trainer.tasks)
        raise Optim4RLError(f"this meta-training run needs at least {need / 2**30:,.1f} GiB ({agents} agents "
                            f"per task, {trainer.cfg.inner_updates} inner updates each) but "
                            f"{available / 2**30:,.1f} GiB are free; use fewer agents or envs per agent")


def save_optimizer(path: Path, trainer: MetaTrainer, phi, info: dict[str, Any]) -> None:
    from optim4rl import optimizers

    optimizers.save(path, trainer.opt, jax.device_get(phi), info=info)


def run(
    cfg: MetaConfig,
    out: Path | str,
    callback: Callback | None = None,
    resume: bool = False,
    preset: str | None = None,
    stop_after_chunks: int | None = None,
    time_limit_s: float | None = None,
    overwrite: bool = False,
    trainer: MetaTrainer | None = None,
) -> dict[str, Any]:
    """Meta-trains per `cfg` into run directory `out`; returns the summary.

    `time_limit_s` (wall-clock seconds of this process) stops the run at the first chunk boundary
    past the limit: the checkpoint and ``optimizer_latest.o4r`` (φ so far, with its iteration in
    the provenance) are written, and ``--resume`` continues it. The summary then has
    ``stopped_at_iteration`` and no ``optimizer.o4r`` is written: a truncated φ is never saved
    under the final name.
    """
    mode = claim_run_dir(out, cfg, resume=resume, overwrite=overwrite,
                         extendable={"iterations": "--iterations"})
    if mode == "finished":
        return json.loads((Path(out) / "summary.json").read_text())
    if trainer is None:  # a trainer passed in was built (and its memory checked) by the caller
        trainer = MetaTrainer(cfg)
        check_memory(trainer)
    run_dir = RunDir(out)
    state = place(trainer.init(), trainer)
    ckpt_path = run_dir.file("checkpoint.msgpack")
    elapsed_before = 0.0
    extended_from = None
    if mode == "resume":
        previous = json.loads(run_dir.file("config.json").read_text())
        state, meta = load_checkpoint(ckpt_path, state)
        elapsed_before = float(meta.get("wall_time_s", 0.0))
        extended_from = previous.get("extended_from_iterations")  # kept over later resumes
        if previous["config"].get("iterations") != cfg.iterations:
            extended_from = previous["config"].get("iterations")
        done = int(state.iteration)
        # Rows after the checkpoint are recomputed (a torn last row is dropped with them).
        rows = [r for r in read_csv(run_dir.file("metrics.csv"), tolerate_torn=True)
                if isinstance(r.get("iteration"), (int, float)) and r["iteration"] <= done] \
            if run_dir.file("metrics.csv").exists() else []
        writer = run_dir.metrics_writer()
        writer.write(rows)
    else:
        writer = run_dir.metrics_writer()
    extra = {}
    if cfg.init_from:
        from optim4rl.optimizers import optimizer_source

        extra["init_from"] = optimizer_source(f"{cfg.optimizer}:{cfg.init_from}")  # path + SHA-256
    if extended_from is not None:
        extra["extended_from_iterations"] = extended_from
    # "auto" rematerialisation is resolved by the trainer from its memory estimate.
    extra["remat_used"] = trainer.remat
    extra["remat_estimate_mib"] = round(trainer.remat_estimate_bytes / 2**20, 1)
    record = run_dir.write_config(cfg, preset=preset, devices=[str(d) for d in jax.devices()], **extra)

    evaluator = Evaluator(trainer) if cfg.eval_steps > 0 else None
    steps_per_iter = cfg.env_steps_per_iteration()
    eval_path = run_dir.file("evaluations.csv")
    eval_rows = [r for r in read_csv(eval_path, tolerate_torn=True)
                 if isinstance(r.get("iteration"), (int, float)) and r["iteration"] <= int(state.iteration)] \
        if mode == "resume" and eval_path.exists() else []
    eval_writer = run_dir.metrics_writer("evaluations")
    eval_writer.write(eval_rows)
    last_ckpt = time.time()
    t_start = time.time()
    timed_iters, timed_s = 0, 0.0
    chunks_run = 0
    stopped_by = None  # set when --time-limit ends the run early
    eval_key = jax.random.key(cfg.seed + 7919)

    def maybe_evaluate(iteration: int) -> float | None:
        if evaluator is None:
            return None
        if eval_rows and eval_rows[-1]["iteration"] == iteration:
            return eval_rows[-1]["eval_return"]
        value = evaluator(state.phi, jax.random.fold_in(eval_key, iteration))
        row = {"iteration": iteration, "eval_return": value, "task": evaluator.task.env}
        eval_rows.append(row)
        eval_writer.write([row])
        return value

    if int(state.iteration) == 0 and cfg.eval_every and evaluator is not None:
        maybe_evaluate(0)

    while int(state.iteration) < cfg.iterations:
        start_iter = int(state.iteration)
        length = min(cfg.iterations_per_chunk, cfg.iterations - start_iter)
        t0 = time.time()
        state, metrics = trainer.jitted_chunk(length)(state)
        metrics = jax.device_get(metrics)
        dt = time.time() - t0
        skipped_now = float(np.sum(metrics.get("skipped_update", 0.0)))
        if skipped_now > 0.5 * length or not _finite(state.phi):
            raise MetaTrainingDiverged(
                f"meta-training diverged at meta-iterations {start_iter + 1}-{start_iter + length}: "
                f"{skipped_now:.0f} of {length} meta-updates were skipped (non-finite meta-gradients)"
                f"{'' if _finite(state.phi) else ' and φ is non-finite'}; nothing was saved from this "
                f"chunk (try a smaller meta_learning_rate; --resume restarts from the last checkpoint)")
        if chunks_run > 0:
            timed_iters, timed_s = timed_iters + length, timed_s + dt
        chunks_run += 1
        end_iter = start_iter + length
        rows = []
        for i in range(length):
            it = start_iter + i + 1
            row = {"iteration": it, "env_steps": it * steps_per_iter}
            row.update({k: float(v[i]) for k, v in sorted(metrics.items())})
            rows.append(row)
        eval_value = None
        if cfg.eval_every and end_iter // cfg.eval_every > start_iter // cfg.eval_every:
            eval_value = maybe_evaluate(end_iter)
            rows[-1]["eval_return"] = eval_value
        writer.write(rows)
        if callback is not None:
            sps = timed_iters * steps_per_iter / timed_s if timed_s > 0 else float("nan")
            event = {"iteration": end_iter, "iterations": cfg.iterations,
                     "env_steps": end_iter * steps_per_iter, "total_steps": cfg.iterations * steps_per_iter,
                     "steps_per_s": sps, "meta_loss": float(np.mean(metrics["meta_loss"])),
                     "update_scale": float(np.mean([np.mean(v) for k, v in metrics.items()
                                                    if k.startswith("update_scale/")])),
                     "skipped": int(state.skipped)}
            if eval_value is not None:
                event["eval_return"] = eval_value
            callback(event)
        out_of_time = (time_limit_s is not None and end_iter < cfg.iterations
                       and time.time() - t_start > time_limit_s)
        if (out_of_time or time.time() - last_ckpt > cfg.checkpoint_every_s or end_iter >= cfg.iterations
                or chunks_run % 10 == 0):
            save_checkpoint(ckpt_path, state, {"iteration": end_iter,
                                               "wall_time_s": elapsed_before + time.time() - t_start})
            save_optimizer(run_dir.file("optimizer_latest.o4r"), trainer, state.phi,
                           _provenance(record, cfg, end_iter, preset))
            last_ckpt = time.time()
        if stop_after_chunks is not None and chunks_run >= stop_after_chunks:
            save_checkpoint(ckpt_path, state, {"iteration": end_iter,
                                               "wall_time_s": elapsed_before + time.time() - t_start})
            return {"stopped_at_iteration": end_iter}
        if out_of_time:
            stopped_by = f"time limit {time_limit_s:g}s"
            break

    iteration = int(state.iteration)
    final_eval = maybe_evaluate(iteration) if evaluator is not None and stopped_by is None else None
    wall = elapsed_before + time.time() - t_start
    # A stopped run's φ is already in optimizer_latest.o4r (written with its checkpoint above).
    optimizer_file = run_dir.file("optimizer_latest.o4r" if stopped_by else "optimizer.o4r")
    if not stopped_by:
        save_optimizer(optimizer_file, trainer, state.phi, _provenance(record, cfg, iteration, preset))
    summary = {
        "optimizer": cfg.optimizer, "tasks": [t.env for t in cfg.tasks],
        "iterations": iteration, "env_steps": iteration * steps_per_iter,
        "skipped_updates": int(state.skipped), "wall_time_s": wall,
        "steps_per_s": timed_iters * steps_per_iter / timed_s if timed_s > 0 else None,
        "final_eval_return": final_eval, "evaluations": eval_rows,
        "optimizer_file": str(optimizer_file),
        "remat": trainer.remat,
    }
    if stopped_by:
        summary.update(stopped_at_iteration=iteration, stopped_by=stopped_by)
    run_dir.write_summary(summary)
    _plot(run_dir, cfg)
    return summary


class MetaTrainingDiverged(Optim4RLError):
    """Most meta-updates of a chunk were skipped, or φ became non-finite."""


def _finite(tree) -> bool:
    return bool(all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(tree))))


def _provenance(record: dict, cfg: MetaConfig, iteration: int, preset: str | None) -> dict[str, Any]:
    return {
        "command": record.get("command"), "preset": preset, "config": record.get("config"),
        "seed": cfg.seed, "code_version": record.get("code_version"), "meta_iterations": iteration,
        "env_steps": iteration * cfg.env_steps_per_iteration(),
        "trained_on": [t.env for t in cfg.tasks], "pipeline": cfg.pipeline,
        **({"init_from": record["init_from"]} if record.get("init_from") else {}),
    }


def _plot(run_dir: RunDir, cfg: MetaConfig) -> None:
    from optim4rl.analysis import plots

    rows = read_csv(run_dir.file("metrics.csv"))
    if not rows:
        return
    plots.plot_meta_training(rows, [t.env for t in cfg.tasks], cfg.age_bins, run_dir.file("meta_training.png"))


def load_config(data: dict) -> MetaConfig:
    """A MetaConfig from a preset's [meta] table (tasks as [[meta.tasks]])."""
    from optim4rl import config as config_lib

    return config_lib.from_dict(MetaConfig, data, "meta")
