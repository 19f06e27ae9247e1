"""Cost of one optimizer step in PyTorch (optim4rl.torch) vs JAX, learned vs Adam, on this CPU.

On the ~100k-parameter MLP of ``optimizer_overhead.py`` (64 -> 256 -> 256 -> 64 -> 17), times
``optimizer.step()`` of torch Adam and of optim4rl.torch's Optim4RL (grid6), L2L, Lin and STAR
(their shipped files), and one jitted JAX update with the same φ (``tx.update`` followed by
``optax.apply_updates``, so that both sides apply the step). Gradients are fixed, 1e-3 · N(0, 1),
with an elementwise clip of 1. Prints nanoseconds per parameter per update (median and minimum of
``--repeats`` runs) and writes ``benchmarks/results/torch_overhead.json``.

Both frameworks run on ``--threads`` threads (default 1): on a small machine shared with other
jobs, spinning thread pools make multi-threaded timings mostly measure the other jobs.

    python benchmarks/torch_overhead.py [--repeats 100] [--threads 1] [--output PATH]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import git_commit  # noqa: E402

LAYER_SIZES = (64, 256, 256, 64, 17)  # 99,985 parameters in 8 tensors, as optimizer_overhead.py
LEARNED = {  # label: (optim4rl.torch class name, spec of the same φ for JAX)
    "optim4rl": ("Optim4RL", "optim4rl:grid6"),
    "l2l": ("L2L", "l2l:l2l-big_dense_long"),
    "lin": ("Lin", "lin:lin-big_dense_long"),
    "star": ("STAR", "star:star-big_dense_long"),
}


def summarise(times: list[float], num_params: int) -> dict:
    median = statistics.median(times)
    return {"median_us": round(median * 1e6, 1), "min_us": round(min(times) * 1e6, 1),
            "ns_per_param": round(median * 1e9 / num_params, 2),
            # The minimum is the better estimate on a machine shared with other jobs.
            "min_ns_per_param": round(min(times) * 1e9 / num_params, 2)}


def time_torch(make_optimizer, repeats: int) -> tuple[list[float], int]:
    import torch

    torch.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1])
    for p in model.parameters():
        p.grad = 1e-3 * torch.randn_like(p)
    optimizer = make_optimizer(model.parameters())
    for _ in range(5):
        optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times, sum(p.numel() for p in model.parameters())


def time_jax(spec: str, repeats: int) -> list[float]:
    import jax
    import jax.numpy as jnp
    import optax

    import optim4rl

    key = jax.random.key(0)
    params = []
    for fan_in, fan_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        params.append({"kernel": jax.random.normal(k1, (fan_in, fan_out)) / fan_in ** 0.5,
                       "bias": jnp.zeros((fan_out,))})
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(jax.random.key(1), p.shape), params)
    tx = optim4rl.make_optimizer(spec, learning_rate=1e-3, grad_clip=1.0)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(5):
        params, state = jax.block_until_ready(step(params, state))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, state = jax.block_until_ready(step(params, state))
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "torch_overhead.json")
    args = parser.parse_args()
    # Before JAX starts its thread pool: XLA's CPU backend on this many threads.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_cpu_multi_thread_eigen={str(args.threads > 1).lower()}"
                               f" intra_op_parallelism_threads={args.threads}")
    import torch

    import optim4rl.torch as ot
    from _common import machine_info, write_report

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    results, num_params = {}, 0
    times, num_params = time_torch(lambda p: torch.optim.Adam(p, lr=1e-3), args.repeats)
    results["torch_adam"] = summarise(times, num_params)
    results["jax_adam"] = summarise(time_jax("adam", args.repeats), num_params)
    for label, (class_name, spec) in LEARNED.items():
        cls = getattr(ot, class_name)
        times, _ = time_torch(lambda p: cls(p, lr=1e-3, file=spec, grad_clip=1.0), args.repeats)
        results[f"torch_{label}"] = summarise(times, num_params)
        results[f"jax_{label}"] = summarise(time_jax(spec, args.repeats), num_params)

    report = {
        "benchmark": "torch_overhead",
        "description": "one optimizer step (update applied), ~100k-parameter MLP, grad_clip=1 "
                       "for the learned ones; torch optimizer.step() vs jitted JAX update",
        "num_params": num_params,
        "layer_sizes": list(LAYER_SIZES),
        "repeats": args.repeats,
        "threads": args.threads,
        **machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "files": {label: spec for label, (_, spec) in LEARNED.items()},
        "results": results,
        "torch_optim4rl_vs_jax": round(results["torch_optim4rl"]["min_ns_per_param"]
                                       / results["jax_optim4rl"]["min_ns_per_param"], 2),
        "torch_optim4rl_vs_torch_adam": round(results["torch_optim4rl"]["min_ns_per_param"]
                                              / results["torch_adam"]["min_ns_per_param"], 1),
    }
    print(f"one optimizer step, {num_params:,} parameters, {args.threads} thread(s), "
          f"load average {load_before:.1f}, median (min) of {args.repeats}")
    print(f"{'optimizer':<10}{'torch ns/param':>22}{'JAX ns/param':>22}")
    for label in ["adam", *LEARNED]:
        t, j = results[f"torch_{label}"], results[f"jax_{label}"]
        print(f"{label:<10}{t['ns_per_param']:>12.1f} ({t['min_ns_per_param']:>6.1f})"
              f"{j['ns_per_param']:>14.1f} ({j['min_ns_per_param']:>6.1f})")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
