"""Training throughput of our PPO against Brax's own PPO, and the cost of a learned optimizer.

Runs, one after another on the same backend and sizes (num_envs, batch_size, num_minibatches,
unroll_length, epochs):

- ``brax``: ``brax.training.agents.ppo.train.train`` with Adam (its ``training/sps`` per epoch);
- ``ours_adam``: ``optim4rl.agents.ppo`` with ``optax.adam`` (same settings as Brax: no clipping);
- ``ours_adam_clip``: ours with ``make_optimizer("adam", grad_clip=1.0)`` (the paper's setting);
- ``ours_optim4rl``: ours with ``make_optimizer("optim4rl:init", grad_clip=1.0)``.

Environment steps per second of training exclude compilation (warm-up chunks / epochs) and
evaluation (none runs during the timed part); rates are given per wall-clock second and per CPU
second of this process (steadier when other jobs share the machine). Reports ours/Brax (goal ≥ 1) and
Optim4RL/Adam (both clipped), prints a table and writes ``benchmarks/results/ppo_throughput.json``.

    python benchmarks/ppo_throughput.py [--task inverted_double_pendulum] [--backend positional]
        [--num-envs 128] [--batch-size 128] [--num-minibatches 16] [--repeats 3]
        [--runs ours_adam,brax,ours_adam_clip,ours_optim4rl]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import machine_info, write_report  # noqa: E402

import optim4rl  # noqa: E402
from optim4rl import envs  # noqa: E402
from optim4rl.agents import ppo  # noqa: E402


def ppo_config(args) -> ppo.PPOConfig:
    """docs/paper_settings.md §4's settings for the task, at the benchmark's sizes, without evaluation."""
    paper = ppo.PPOConfig.paper(args.task)
    return paper.replace(
        env=args.task,
        env_kwargs=(("backend", args.backend),),
        num_envs=args.num_envs,
        batch_size=args.batch_size,
        num_minibatches=args.num_minibatches,
        updates_per_chunk=args.updates_per_chunk,
        total_steps=args.updates_per_chunk * (args.repeats + 1)
        * args.batch_size * args.num_minibatches * paper.unroll_length,
        num_eval_envs=0,
        eval_every=0,
    )


def time_ours(cfg: ppo.PPOConfig, env, tx, repeats: int) -> dict:
    """Steps/s of ``repeats`` jitted chunks after a warm-up chunk (which compiles)."""
    train = ppo.make_train(cfg, tx, env=env)
    t0 = time.perf_counter()
    state = jax.block_until_ready(jax.jit(train.init)(jax.random.key(0)))
    run_chunk = jax.jit(train.run_chunk, donate_argnums=0)
    state, metrics = run_chunk(state)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0
    steps = train.updates_per_chunk * train.steps_per_update
    marks = [(time.perf_counter(), time.process_time())]
    for _ in range(repeats):
        state, metrics = run_chunk(state)
        jax.block_until_ready(metrics)
        marks.append((time.perf_counter(), time.process_time()))
    return {**_rates(marks, steps), "compile_and_first_chunk_s": round(warmup_s, 1), "steps_per_chunk": steps}


def _rates(marks: list[tuple[float, float]], steps: int) -> dict:
    """Steps per wall second and per CPU second (all threads of this process) between marks.

    On a machine shared with other jobs the wall-clock rate swings with their load; the CPU-time
    rate measures the work this process did and is the steadier basis for a ratio.
    """
    wall = [steps / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    cpu = [steps / (b[1] - a[1]) for a, b in zip(marks, marks[1:])]
    return {"steps_per_s": wall, "steps_per_cpu_s": cpu}


def _patch_jax_for_brax() -> None:
    """Brax 0.14's PPO calls ``jax.device_put_replicated``, which newer JAX removed; put back the
    drop-in replacement from JAX's pmap migration guide (stack one copy per device)."""
    try:
        jax.device_put_replicated  # noqa: B018
    except AttributeError:
        def device_put_replicated(x, devices):
            stacked = jax.tree.map(lambda a: jnp.stack([jnp.asarray(a)] * len(devices)), x)
            mesh = jax.sharding.Mesh(np.array(devices), ("replica",))
            return jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica")))

        jax.device_put_replicated = device_put_replicated


def time_brax(cfg: ppo.PPOConfig, env, learning_rate: float, repeats: int) -> dict:
    """Brax's rate over ``repeats`` epochs after two warm-up epochs: the first compiles, and the
    second compiles again because the training state now arrives with pmap's output sharding."""
    from brax.training.agents.ppo import train as brax_ppo

    _patch_jax_for_brax()

    marks, brax_sps = [], []

    def progress(step, metrics):
        marks.append((time.perf_counter(), time.process_time()))
        brax_sps.append(float(metrics["training/sps"]))

    steps = cfg.updates_per_chunk * cfg.steps_per_update
    t0 = time.perf_counter()
    brax_ppo.train(
        environment=env.brax_env,
        num_timesteps=steps * (repeats + 2),
        episode_length=env.episode_length,
        action_repeat=env.action_repeat,
        num_envs=cfg.num_envs,
        learning_rate=learning_rate,
        entropy_cost=cfg.entropy_cost,
        discounting=cfg.discounting,
        unroll_length=cfg.unroll_length,
        batch_size=cfg.batch_size,
        num_minibatches=cfg.num_minibatches,
        num_updates_per_batch=cfg.num_updates_per_batch,
        normalize_observations=cfg.normalize_observations,
        reward_scaling=cfg.reward_scaling,
        clipping_epsilon=cfg.clipping_epsilon,
        gae_lambda=cfg.gae_lambda,
        vf_loss_coefficient=2.0 * cfg.value_loss_coef,  # Brax's value loss is 0.5 · coef · mean sq.
        num_evals=repeats + 3,  # an initial evaluation slot (unused), then repeats + 2 epochs
        run_evals=False,
        seed=0,
        progress_fn=progress,
    )
    total_s = time.perf_counter() - t0
    return {**_rates(marks[1:], steps), "brax_training_sps": brax_sps, "total_s": round(total_s, 1),
            "steps_per_chunk": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="inverted_double_pendulum")
    parser.add_argument("--backend", default="positional")
    parser.add_argument("--num-envs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-minibatches", type=int, default=16)
    parser.add_argument("--updates-per-chunk", type=int, default=2, help="updates per timed chunk / Brax epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks / epochs after the warm-up")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--runs", default="ours_adam,brax,ours_adam_clip,ours_optim4rl",
                        help="comma-separated subset of the runs to do")
    parser.add_argument("--output", type=pathlib.Path, default=ROOT / "benchmarks" / "results" / "ppo_throughput.json")
    args = parser.parse_args()

    cfg = ppo_config(args)
    env = envs.make(args.task, backend=args.backend)
    lr = args.learning_rate
    runs = {
        "ours_adam": lambda: time_ours(cfg, env, optax.adam(lr), args.repeats),
        "brax": lambda: time_brax(cfg, env, lr, args.repeats),
        "ours_adam_clip": lambda: time_ours(
            cfg, env, optim4rl.make_optimizer("adam", learning_rate=lr, grad_clip=1.0), args.repeats),
        "ours_optim4rl": lambda: time_ours(
            cfg, env, optim4rl.make_optimizer("optim4rl:init", learning_rate=lr, grad_clip=1.0), args.repeats),
    }
    selected = [name.strip() for name in args.runs.split(",") if name.strip()]
    unknown = [name for name in selected if name not in runs]
    if unknown:
        parser.error(f"unknown run {unknown[0]!r}; choose from {', '.join(runs)}")
    results = {}
    for label in selected:
        print(f"running {label} ...", flush=True)
        row = results[label] = runs[label]()
        row["median_steps_per_s"] = round(statistics.median(row["steps_per_s"]), 1)
        row["median_steps_per_cpu_s"] = round(statistics.median(row["steps_per_cpu_s"]), 1)
        print(f"  {label}: median {row['median_steps_per_s']:.0f} steps/s, "
              f"{row['median_steps_per_cpu_s']:.0f} steps/CPU-s "
              f"(per chunk: {', '.join(f'{x:.0f}' for x in row['steps_per_s'])})", flush=True)

    ratios = {}
    for basis in ("steps_per_s", "steps_per_cpu_s"):
        median = {k: v[f"median_{basis}"] for k, v in results.items()}
        if "brax" in median and "ours_adam" in median:
            ratios[f"ours_over_brax ({basis})"] = round(median["ours_adam"] / median["brax"], 3)
        if "ours_optim4rl" in median and "ours_adam_clip" in median:
            ratios[f"optim4rl_over_adam ({basis})"] = round(median["ours_optim4rl"] / median["ours_adam_clip"], 3)
    report = {
        "benchmark": "ppo_throughput",
        "description": "PPO training env-steps/s excluding compilation and evaluation",
        "task": args.task,
        "backend": args.backend,
        "sizes": {
            "num_envs": cfg.num_envs, "batch_size": cfg.batch_size, "num_minibatches": cfg.num_minibatches,
            "unroll_length": cfg.unroll_length, "num_updates_per_batch": cfg.num_updates_per_batch,
            "steps_per_update": cfg.steps_per_update, "updates_per_timed_chunk": cfg.updates_per_chunk,
            "timed_chunks": args.repeats,
        },
        **machine_info(),
        "results": results,
        "ratios": ratios,
    }

    print(f"\nPPO on {args.task} ({args.backend}), {report['device']}, {cfg.num_envs} envs, "
          f"{cfg.steps_per_update} steps/update, load {report['load_average']:.1f}")
    print(f"{'run':<16}{'median steps/s':>16}{'median steps/CPU-s':>20}")
    for label, row in results.items():
        print(f"{label:<16}{row['median_steps_per_s']:>16.0f}{row['median_steps_per_cpu_s']:>20.0f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
