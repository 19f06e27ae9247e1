"""Cost of one optimizer update, learned vs. hand-designed, on a ~100k-parameter MLP.

For every optimizer, times one jitted ``tx.update(grads, state, params)`` (median over many runs,
each ended by ``block_until_ready``), reports it relative to Adam and per parameter, prints a table
and writes ``benchmarks/results/optimizer_overhead.json``.

    python benchmarks/optimizer_overhead.py [--repeats 200] [--output PATH]
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import machine_info, write_report  # noqa: E402

import optim4rl  # noqa: E402

# A 64 -> 256 -> 256 -> 64 -> 17 MLP: 99,985 parameters in 8 tensors.
LAYER_SIZES = (64, 256, 256, 64, 17)

OPTIMIZERS = {  # label: (spec, architecture options)
    "adam": ("adam", {}),
    "rmsprop": ("rmsprop", {}),
    "sgd": ("sgd", {}),
    "optim4rl": ("optim4rl:init", {}),
    "optim4rl_raw": ("optim4rl:init", {"inputs": "raw"}),
    "l2l": ("l2l:init", {}),
    "lin": ("lin:init", {}),
    "star": ("star:init", {}),
}


def mlp_params(key: jax.Array) -> dict:
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(LAYER_SIZES[:-1], LAYER_SIZES[1:])):
        key, sub = jax.random.split(key)
        params[f"dense{i}"] = {
            "kernel": jax.random.normal(sub, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in),
            "bias": jnp.zeros((fan_out,), jnp.float32),
        }
    return params


def time_update(tx, params, grads, repeats: int) -> list[float]:
    """Seconds of ``repeats`` jitted updates (compiled and warmed up first)."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(5):
        jax.block_until_ready(update(grads, state, params))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(update(grads, state, params))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--output", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "optimizer_overhead.json")
    args = parser.parse_args()

    params = mlp_params(jax.random.key(0))
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape), params)
    num_params = sum(int(p.size) for p in jax.tree.leaves(params))

    times = {}
    for label, (spec, options) in OPTIMIZERS.items():
        tx = optim4rl.make_optimizer(spec, learning_rate=1e-3, grad_clip=1.0, **options)
        times[label] = time_update(tx, params, grads, args.repeats)
    seconds = {label: statistics.median(t) for label, t in times.items()}

    results = {
        label: {
            "median_us": round(s * 1e6, 2),
            # The minimum is the better estimate on a machine shared with other jobs.
            "min_us": round(min(times[label]) * 1e6, 2),
            "relative_to_adam": round(s / seconds["adam"], 2),
            "ns_per_param": round(s * 1e9 / num_params, 3),
        }
        for label, s in seconds.items()
    }
    report = {
        "benchmark": "optimizer_overhead",
        "description": "median time of one jitted tx.update on an MLP, grad_clip=1",
        "num_params": num_params,
        "layer_sizes": list(LAYER_SIZES),
        "repeats": args.repeats,
        **machine_info(),
        "results": results,
        "optim4rl_ns_per_param": results["optim4rl"]["ns_per_param"],
    }

    print(f"one jitted update, {num_params:,} parameters, {report['device']}, "
          f"median of {args.repeats}")
    print(f"{'optimizer':<14}{'median µs':>12}{'min µs':>10}{'× Adam':>9}{'ns/param':>10}")
    for label, row in results.items():
        print(f"{label:<14}{row['median_us']:>12.1f}{row['min_us']:>10.1f}"
              f"{row['relative_to_adam']:>9.2f}{row['ns_per_param']:>10.3f}")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
