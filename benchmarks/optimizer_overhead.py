"""Cost of one optimizer update, learned vs. hand-designed, on a ~100k-parameter MLP.

For every optimizer, times one jitted ``tx.update(grads, state, params)`` (median over many runs,
each ended by ``block_until_ready``), reports it relative to Adam and per parameter, with the
update's FLOPs per coordinate (XLA's cost analysis of the compiled update; transcendentals
counted apart) and the fraction of this CPU's float32 peak it reaches, the peak being measured in
the same run by a large float32 matmul. Optim4RL's, L2L's, Lin's and STAR's rows use the fused
CPU kernels where they are built (``optim4rl.optimizers.native``); the ``_jax`` rows time the same
architectures as plain JAX, in the same rounds. FLOPs are always those of the JAX network.

A second figure, "in a loop", is the cost per update inside a jitted ``lax.scan`` of
``LOOP_UPDATES`` updates, each applied to the parameters (state and parameters carried, the
gradient fixed), as in a training loop: there XLA reuses the state's buffers, while one call of a
jitted update also allocates and fills a fresh state (6.4 MB for Optim4RL here). Prints a table
and writes ``benchmarks/results/optimizer_overhead.json``.

    python benchmarks/optimizer_overhead.py [--repeats 200] [--block-single-forward]
        [--output PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
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

from _common import git_commit, machine_info, timed_runs, write_report  # noqa: E402

import optim4rl  # noqa: E402
from optim4rl.optimizers import native  # noqa: E402

# A 64 -> 256 -> 256 -> 64 -> 17 MLP: 99,985 parameters in 8 tensors.
LAYER_SIZES = (64, 256, 256, 64, 17)

OPTIMIZERS = {  # label: (spec, architecture options)
    "adam": ("adam", {}),
    "rmsprop": ("rmsprop", {}),
    "sgd": ("sgd", {}),
    "optim4rl": ("optim4rl:init", {}),
    "optim4rl_raw": ("optim4rl:init", {"inputs": "raw"}),
    "rlc2024": ("optim4rl:init", {"inputs": "raw", "head_sizes": ()}),
    "l2l": ("l2l:init", {}),
    "lin": ("lin:init", {}),
    "star": ("star:init", {}),
}
# Optim4RL's, L2L's, Lin's and STAR's rows run through the fused CPU kernels where they are built;
# these run the same architectures as plain JAX, timed in the same rounds (before/after).
JAX_NETWORK = ("optim4rl", "optim4rl_raw", "rlc2024", "l2l", "lin", "star")


def mlp_params(key: jax.Array) -> dict:
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in),
            "bias": jnp.zeros((fan_out,), jnp.float32),
        }
    return params


def peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a ``size``-square float32 matmul (best of ``repeats``): this CPU's usable peak."""
    a = jax.random.normal(jax.random.key(2), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(3), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


LOOP_UPDATES = 20


def update_loop(tx):
    """``LOOP_UPDATES`` updates in one ``lax.scan``, each applied to the parameters."""
    def run(grads, state, params):
        def body(carry, _):
            state, params = carry
            updates, state = tx.update(grads, state, params)
            return (state, optax.apply_updates(params, updates)), None

        return jax.lax.scan(body, (state, params), None, length=LOOP_UPDATES)[0]

    return run


def update_cost(tx, params, grads) -> dict:
    """XLA's FLOP and transcendental counts of the compiled update, with the network as JAX
    (XLA cannot count inside the fused kernel's custom call)."""
    with native.disabled():
        compiled = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(grads, tx.init(params), params).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"flops": float(cost.get("flops", 0.0)),
            "transcendentals": float(cost.get("transcendentals", 0.0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--output", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "optimizer_overhead.json")
    parser.add_argument("--block-single-forward", action="store_true",
                        help="block the forward pass of one agent too (the earlier behaviour)")
    args = parser.parse_args()
    from optim4rl.optimizers import base
    base.BLOCK_SINGLE_FORWARD = args.block_single_forward

    params = mlp_params(jax.random.key(0))
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape), params)
    num_params = sum(int(p.size) for p in jax.tree.leaves(params))

    peak = peak_flops()
    runs, costs, loops = {}, {}, {}  # label: (compiled update, its arguments); compiled loop
    labels = list(OPTIMIZERS) + [f"{label}_jax" for label in JAX_NETWORK]
    for label in labels:
        spec, options = OPTIMIZERS[label.removesuffix("_jax")]
        tx = optim4rl.make_optimizer(spec, learning_rate=1e-3, grad_clip=1.0, **options)
        costs[label] = update_cost(tx, params, grads)
        state = tx.init(params)
        context = native.disabled() if label.endswith("_jax") else contextlib.nullcontext()
        with context:  # traced (compiled) here, inside the context
            update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p)).lower(grads, state, params).compile()
            loop = jax.jit(update_loop(tx)).lower(grads, state, params).compile()
        runs[label] = (update, (grads, state, params))
        loops[label] = loop
    # Rounds over all optimizers in turn, so that a change of load hits them all alike.
    times = {label: [] for label in labels}
    loop_times = {label: [] for label in labels}
    loads = {label: [] for label in labels}
    rounds = 4
    for _ in range(rounds):
        for label, (update, update_args) in runs.items():
            times[label] += timed_runs(update, update_args, max(1, args.repeats // rounds))
            loop_times[label] += timed_runs(loops[label], update_args,
                                            max(1, args.repeats // (rounds * LOOP_UPDATES)) + 2)
            loads[label].append(os.getloadavg()[0])
    loads = {label: round(max(values), 2) for label, values in loads.items()}
    seconds = {label: statistics.median(t) for label, t in times.items()}
    loop_seconds = {label: statistics.median(t) / LOOP_UPDATES for label, t in loop_times.items()}

    results = {
        label: {
            "median_us": round(s * 1e6, 2),
            # The minimum is the better estimate on a machine shared with other jobs.
            "min_us": round(min(times[label]) * 1e6, 2),
            "relative_to_adam": round(s / seconds["adam"], 2),
            "ns_per_param": round(s * 1e9 / num_params, 3),
            "flops_per_param": round(costs[label]["flops"] / num_params, 1),
            "transcendentals_per_param": round(costs[label]["transcendentals"] / num_params, 1),
            # Achieved FLOP/s (median time) over the matmul peak.
            "percent_of_peak": round(100.0 * costs[label]["flops"] / s / peak, 2),
            "load_average": loads[label],
            "loop_ns_per_param": round(loop_seconds[label] * 1e9 / num_params, 3),
            "loop_relative_to_adam": round(loop_seconds[label] / loop_seconds["adam"], 2),
            "loop_percent_of_peak": round(100.0 * costs[label]["flops"] / loop_seconds[label] / peak, 2),
        }
        for label, s in seconds.items()
    }
    report = {
        "benchmark": "optimizer_overhead",
        "description": "median time of one jitted tx.update on an MLP, grad_clip=1; loop_*: per update in a jitted lax.scan of LOOP_UPDATES applied updates",
        "loop_updates": LOOP_UPDATES,
        "num_params": num_params,
        "layer_sizes": list(LAYER_SIZES),
        "repeats": args.repeats,
        "block_single_forward": base.BLOCK_SINGLE_FORWARD,
        "cpu_block_size": base.CPU_BLOCK_SIZE,
        "peak_gflops_matmul_2048": round(peak / 1e9, 1),
        "commit": git_commit(),
        **machine_info(),
        "results": results,
        "optim4rl_ns_per_param": results["optim4rl"]["ns_per_param"],
        "rlc2024_ns_per_param": results["rlc2024"]["ns_per_param"],
        "optim4rl_loop_ns_per_param": results["optim4rl"]["loop_ns_per_param"],
        "rlc2024_loop_ns_per_param": results["rlc2024"]["loop_ns_per_param"],
    }

    print(f"one jitted update, {num_params:,} parameters, {report['device']}, "
          f"median of {args.repeats}; peak (2048² float32 matmul) {peak / 1e9:.1f} GFLOP/s")
    print(f"{'optimizer':<14}{'median µs':>12}{'min µs':>10}{'× Adam':>9}{'ns/param':>10}"
          f"{'FLOP/param':>12}{'transc.':>9}{'% peak':>8}{'load':>7}"
          f"  | in a loop: {'ns/param':>9}{'× Adam':>8}{'% peak':>8}")
    for label, row in results.items():
        print(f"{label:<14}{row['median_us']:>12.1f}{row['min_us']:>10.1f}"
              f"{row['relative_to_adam']:>9.2f}{row['ns_per_param']:>10.3f}"
              f"{row['flops_per_param']:>12.1f}{row['transcendentals_per_param']:>9.1f}"
              f"{row['percent_of_peak']:>8.2f}{row['load_average']:>7.2f}"
              f"  |            {row['loop_ns_per_param']:>9.3f}{row['loop_relative_to_adam']:>8.2f}"
              f"{row['loop_percent_of_peak']:>8.2f}")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
