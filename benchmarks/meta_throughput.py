"""Meta-training throughput: environment steps per second of pipeline meta-training, and its memory.

For each preset (CPU scale by default: ``big_dense_long-cpu`` and ``grid6-cpu``; with ``--agent
ppo``, MetaPPO's ``metappo-inverted_double_pendulum-cpu``), builds the
``MetaTrainer`` of the preset's ``[meta]`` table with a smaller population (``--agents``, to keep
the run short), jits ``run_chunk`` (``--iterations-per-chunk`` meta-iterations: per task, K inner
updates with the learned optimizer, the meta-loss and the meta-gradient through them, and the
meta-update), and times ``--repeats`` chunks after a first one that compiles. Environment steps
count every rollout step of a meta-iteration (``MetaConfig.env_steps_per_iteration``: agents ×
(K + 1) × rollout length per task; for PPO agents × (K + 1) × the steps of one PPO batch); rates are per wall-clock second and per CPU second of the
process (steadier on a machine shared with other jobs).

Each preset runs in its own subprocess, so that its peak resident memory (``ru_maxrss``) is its
own; where the device reports memory statistics (GPUs), the peak device memory is given too.
``--block-size`` overrides ``optim4rl.optimizers.base.CPU_BLOCK_SIZE`` (0: the learned optimizer
runs on all coordinates at once, without cache blocking). ``--remat`` overrides the preset's
``meta.remat``; the table shows the setting used ("auto" resolved by the trainer from its memory
estimate, which is reported too). Where the fused CPU kernel of Optim4RL's network is built
(``optim4rl.optimizers.native``), each preset also runs with the network as plain JAX
(``OPTIM4RL_NATIVE=0``), and the kernel's gain is reported (``--network native|jax`` runs one). Prints a table and writes
``benchmarks/results/meta_throughput.json`` (``meta_throughput_ppo.json`` with ``--agent ppo``).

    python benchmarks/meta_throughput.py [--agent a2c|ppo] [--presets big_dense_long-cpu,grid6-cpu] [--agents 8]
        [--iterations-per-chunk 1] [--repeats 3] [--block-size N] [--remat auto|full|none]
        [--optimizer NAME] [--network both|native|jax] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import git_commit, machine_info, write_report  # noqa: E402


DEFAULT_PRESETS = {"a2c": "big_dense_long-cpu,grid6-cpu", "ppo": "metappo-inverted_double_pendulum-cpu"}


def measure(preset: str, agents: int | None, iterations_per_chunk: int, repeats: int,
            block_size: int | None, remat: str | None = None, optimizer: str | None = None) -> dict:
    """Rates and memory of meta-training one preset (runs in a fresh process: see `main`)."""
    import jax
    from jax.flatten_util import ravel_pytree

    from optim4rl import config as config_lib
    from optim4rl.meta import train as meta_train
    from optim4rl.meta.pipeline import MetaTrainer
    from optim4rl.optimizers import base

    if block_size is not None:
        base.CPU_BLOCK_SIZE = block_size
    data = dict(config_lib.load_preset(preset)["meta"])
    data["iterations_per_chunk"] = iterations_per_chunk
    if remat is not None:
        data["remat"] = remat
    if optimizer is not None:  # another learned optimizer on the preset's tasks
        data["optimizer"], data["optimizer_options"] = optimizer, {}
    if agents is not None:
        data["num_agents"] = agents
        data["tasks"] = [{k: v for k, v in task.items() if k != "num_agents"} for task in data["tasks"]]
    cfg = meta_train.load_config(data)
    trainer = MetaTrainer(cfg)

    t0 = time.perf_counter()
    state = meta_train.place(trainer.init(), trainer)
    coordinates = []
    for pop in state.populations:
        per_agent = ravel_pytree(jax.tree.map(lambda x: x[0], pop.params))[0].size
        coordinates.append(int(per_agent) * int(jax.tree.leaves(pop.params)[0].shape[0]))
    run_chunk = jax.jit(trainer.run_chunk, donate_argnums=0)
    state, metrics = run_chunk(state)
    jax.block_until_ready((state, metrics))
    first_chunk_s = time.perf_counter() - t0

    steps = cfg.env_steps_per_iteration() * iterations_per_chunk
    marks = [(time.perf_counter(), time.process_time())]
    for _ in range(repeats):
        state, metrics = run_chunk(state)
        jax.block_until_ready((state, metrics))
        marks.append((time.perf_counter(), time.process_time()))
    wall = [steps / (b[0] - a[0]) for a, b in zip(marks, marks[1:])]
    cpu = [steps / (b[1] - a[1]) for a, b in zip(marks, marks[1:])]

    memory = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return {
        "preset": preset,
        "optimizer": cfg.optimizer,
        "agent": cfg.agent,
        "tasks": [t.env for t in cfg.tasks],
        "agents_per_task": [cfg.task_num_agents(t) for t in cfg.tasks],
        "optimizer_coordinates": sum(coordinates),
        "inner_updates": cfg.inner_updates,
        "rollout_length": cfg.rollout_length,
        "remat": cfg.remat,
        "remat_used": trainer.remat,  # "auto" resolved from the estimate below
        "remat_estimate_mib": round(trainer.remat_estimate_bytes / 2**20, 1),
        "cpu_block_size": base.CPU_BLOCK_SIZE,
        "env_steps_per_iteration": cfg.env_steps_per_iteration(),
        "iterations_per_chunk": iterations_per_chunk,
        "timed_chunks": repeats,
        "compile_and_first_chunk_s": round(first_chunk_s, 1),
        "steps_per_s": wall,
        "steps_per_cpu_s": cpu,
        "median_steps_per_s": round(statistics.median(wall), 1),
        "median_steps_per_cpu_s": round(statistics.median(cpu), 1),
        "median_s_per_iteration": round(statistics.median(steps / r for r in wall) / iterations_per_chunk, 3),
        **memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent", choices=sorted(DEFAULT_PRESETS), default="a2c",
                        help="the default presets: A2C pipeline meta-training, or MetaPPO")
    parser.add_argument("--presets", default=None,
                        help="comma-separated meta-train presets (names or TOML paths; default: the agent's)")
    parser.add_argument("--agents", type=int, default=8,
                        help="agents per task instead of the preset's (0: the preset's)")
    parser.add_argument("--iterations-per-chunk", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks after the first")
    parser.add_argument("--block-size", type=int, default=None,
                        help="override optim4rl.optimizers.base.CPU_BLOCK_SIZE (0: no blocking)")
    parser.add_argument("--remat", choices=("auto", "full", "none"), default=None,
                        help="override the preset's meta.remat (default: the preset's, \"auto\")")
    parser.add_argument("--optimizer", default=None,
                        help="meta-train this learned optimizer (optim4rl, rlc2024, l2l, lin, star) "
                             "instead of the preset's")
    parser.add_argument("--network", choices=("both", "native", "jax"), default="both",
                        help="Optim4RL's network as the fused CPU kernel, as plain JAX, or both (the default; "
                             "JAX only where the kernel is not built)")
    parser.add_argument("--output", type=pathlib.Path, default=None,
                        help="default benchmarks/results/meta_throughput.json (a2c), meta_throughput_ppo.json (ppo)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one preset, JSON on stdout
    args = parser.parse_args()
    agents = args.agents or None
    args.presets = args.presets or DEFAULT_PRESETS[args.agent]
    args.output = args.output or ROOT / "benchmarks" / "results" / (
        "meta_throughput.json" if args.agent == "a2c" else f"meta_throughput_{args.agent}.json")

    if args.worker:
        row = measure(args.worker, agents, args.iterations_per_chunk, args.repeats, args.block_size,
                      args.remat, args.optimizer)
        print(json.dumps(row))
        return

    from optim4rl.optimizers import native

    networks = {"both": ("native", "jax"), "native": ("native",), "jax": ("jax",)}[args.network]
    if native.status() != "native":
        networks = ("jax",)
    results, speedup = {}, {}
    runs = [(p.strip(), n) for p in args.presets.split(",") if p.strip() for n in networks]
    for preset, network in runs:
        label = preset if network == "native" or len(networks) == 1 else f"{preset} (JAX network)"
        print(f"running {label} ...", flush=True)
        command = [sys.executable, __file__, "--worker", preset, "--agents", str(args.agents),
                   "--iterations-per-chunk", str(args.iterations_per_chunk),
                   "--repeats", str(args.repeats)]
        if args.block_size is not None:
            command += ["--block-size", str(args.block_size)]
        if args.remat is not None:
            command += ["--remat", args.remat]
        if args.optimizer is not None:
            command += ["--optimizer", args.optimizer]
        env = dict(os.environ, OPTIM4RL_NATIVE="1" if network == "native" else "0")
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
        row = results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        row["network"] = network
        if network == "jax" and preset in results and results[preset]["network"] == "native":
            speedup[preset] = round(results[preset]["median_steps_per_s"] / row["median_steps_per_s"], 2)
        print(f"  {label}: median {row['median_steps_per_s']:.0f} env-steps/s, "
              f"{row['median_steps_per_cpu_s']:.0f} per CPU-s, "
              f"{row['median_s_per_iteration']:.2f} s/meta-iteration, "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB, remat {row['remat_used']}", flush=True)

    report = {
        "benchmark": "meta_throughput",
        "description": "pipeline meta-training env-steps/s (jitted run_chunk, excluding compilation) "
                       "and peak memory, one subprocess per preset",
        **machine_info(),
        "commit": git_commit(),
        "results": results,
        "native_speedup": speedup,  # env-steps/s with the fused kernel / with the JAX network
    }
    print(f"\nmeta-training throughput, {report['device']}, {args.repeats} timed chunks of "
          f"{args.iterations_per_chunk} meta-iteration(s)")
    header = (f"{'preset':<52}{'agents':>8}{'coords':>11}{'steps/s':>10}{'steps/CPU-s':>13}"
              f"{'s/iter':>8}{'compile s':>11}{'peak RSS MiB':>14}{'remat':>7}")
    print(header)
    for preset, row in results.items():
        agents_text = ",".join(str(a) for a in sorted(set(row["agents_per_task"])))
        print(f"{preset:<52}{agents_text:>8}{row['optimizer_coordinates']:>11,}"
              f"{row['median_steps_per_s']:>10.0f}{row['median_steps_per_cpu_s']:>13.0f}"
              f"{row['median_s_per_iteration']:>8.2f}{row['compile_and_first_chunk_s']:>11.1f}"
              f"{row['peak_rss_mib']:>14.0f}{row['remat_used']:>7}")
    for preset, ratio in speedup.items():
        print(f"fused kernel / JAX network, {preset}: {ratio:.2f}x env-steps/s")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
