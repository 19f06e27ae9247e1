"""Where a learned optimizer's update spends its time: each part of the network, timed alone.

The drop-in benchmark (``dropin_ppo.py``) asks how much slower a PPO run gets with a learned
optimizer; this one answers why. On the drop-in's shape (4 seeds vmapped, 9,155 parameters each:
36,620 coordinates per update) and on one 100k-parameter agent, it times, each jitted alone on
feature-major activations ``[features, N]``:

- the two GRU cells of Optim4RL (hidden 8; GRU-1 reads 2 features, GRU-2 one), with the stacked
  gate matmul (the blocked path) and with the fused row sums (``nets.fused_rows``);
- an MLP head 8 → 16 → 16 → 1 (the default) and a linear head 8 → 1 (rlc2024);
- the inputs ``log(|g| + ε)`` and the update rule ``sign(g)·exp(o1)·rsqrt(exp(o2) + ε)``;
- a copy of a ``[16, N]`` array (the memory traffic of one layer);
- the whole optimizer update (``tx.update``: ravel, network, unravel), default and rlc2024, with
  the fused CPU kernel (``optim4rl.optimizers.native``) and as plain JAX (``_jax``), and Adam's,
  vmapped over the seeds as in the drop-in;
- the meta-gradient of a scalar of that update with respect to the optimizer's meta-parameters
  ``φ`` (``meta_gradient_*``: the forward pass and the reverse mode, what meta-training runs per
  inner update), with the kernel and as plain JAX.

Prints ns per coordinate and writes ``benchmarks/results/kernel_parts.json``.

    python benchmarks/kernel_parts.py [--repeats 300] [--only PREFIX ...] [--output PATH]
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import git_commit, machine_info, timed_runs, write_report  # noqa: E402

import optim4rl  # noqa: E402
from optim4rl import optimizers  # noqa: E402
from optim4rl.optimizers import native, nets  # noqa: E402

SHAPES = {"dropin_4x9155": (4, 9155), "single_100k": (1, 99_985)}


def median_seconds(fn, args, repeats: int) -> float:
    return statistics.median(timed_runs(jax.jit(fn).lower(*args).compile(), args, repeats))


def jax_network(fn):
    """``fn`` traced with the fused CPU kernel turned off: Optim4RL's network as plain JAX."""
    def run(*args):
        with native.disabled():
            return fn(*args)
    return run


def fused(fn):
    def run(*args):
        with nets.fused_rows():
            return fn(*args)
    return run


def parts(seeds: int, n: int) -> dict:
    """``{label: (fn, args)}`` for one shape; every part sees all ``seeds × n`` coordinates."""
    total = seeds * n
    key = jax.random.key(0)
    gru_m, gru_v = nets.gru_init(key, 2, 8), nets.gru_init(key, 1, 8)
    head, linear = nets.mlp_init(key, 8, (16, 16), 1), nets.mlp_init(key, 8, (), 1)
    h = 0.1 * jax.random.normal(key, (8, total))
    x2, x1 = jax.random.normal(key, (2, total)), jax.random.normal(key, (1, total))
    grads = 1e-3 * jax.random.normal(key, (total,))
    o = jax.random.normal(key, (2, total))
    wide = jax.random.normal(key, (16, total))

    def rule(g, o):  # the sign/log inputs of the GRUs, and the update from the heads' outputs
        log_abs = jnp.log(jnp.abs(g) + 1e-18)
        return log_abs, jnp.sign(g) * jnp.exp(o[0]) * jax.lax.rsqrt(jnp.exp(o[1]) + 1e-8)

    table = {
        "gru_2_inputs": (nets.gru_apply, (gru_m, h, x2)),
        "gru_2_inputs_fused_rows": (fused(nets.gru_apply), (gru_m, h, x2)),
        "gru_1_input": (nets.gru_apply, (gru_v, h, x1)),
        "gru_1_input_fused_rows": (fused(nets.gru_apply), (gru_v, h, x1)),
        "head_16_16": (nets.mlp_apply, (head, h)),
        "head_16_16_fused_rows": (fused(nets.mlp_apply), (head, h)),
        "head_linear": (nets.mlp_apply, (linear, h)),
        "update_rule": (rule, (grads, o)),
        "copy_16_rows": (lambda a: a * 2.0, (wide,)),
    }
    params = {"w": jnp.zeros((seeds, n), jnp.float32)}
    stacked_grads = {"w": 1e-3 * jax.random.normal(key, (seeds, n))}
    for label, tx in {
        "update_adam": optax.adam(1e-3),
        "update_optim4rl_default": optim4rl.make_optimizer("optim4rl:init", learning_rate=1e-3),
        "update_optim4rl_rlc2024": optim4rl.make_optimizer("optim4rl:init", learning_rate=1e-3,
                                                           inputs="raw", head_sizes=()),
    }.items():
        state = jax.vmap(tx.init)(params)
        update = jax.vmap(lambda g, s, p, tx=tx: tx.update(g, s, p))
        table[label] = (update, (stacked_grads, state, params))
        if label != "update_adam":  # the same update with the network as plain JAX
            table[label + "_jax"] = (jax_network(update), (stacked_grads, state, params))
    for label, opt in {
        "meta_gradient_optim4rl_default": optimizers.Optim4RL(),
        "meta_gradient_optim4rl_rlc2024": optimizers.Optim4RL(inputs="raw", head_sizes=()),
    }.items():
        phi = opt.init_meta(key)
        state = jax.vmap(opt.transform(phi, 1e-3).init)(params)
        grad = jax.grad(functools.partial(meta_loss, opt))
        table[label] = (grad, (phi, stacked_grads, state, params))
        table[label + "_jax"] = (jax_network(grad), (phi, stacked_grads, state, params))
    return table


def meta_loss(opt, phi, grads, state, params):
    """A scalar of the update, to differentiate with respect to ``phi``: what meta-training's
    backward pass runs through the optimizer (its forward pass, then the reverse mode)."""
    updates, _ = jax.vmap(opt.transform(phi, 1e-3).update)(grads, state, params)
    return jnp.sum(updates["w"] * jnp.cos(jnp.arange(updates["w"].shape[-1], dtype=jnp.float32)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--output", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "kernel_parts.json")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                        help="time only the parts whose label starts with one of these")
    args = parser.parse_args()
    results = {}
    for shape, (seeds, n) in SHAPES.items():
        total = seeds * n
        rows = {}
        print(f"{shape}: {seeds} x {n:,} = {total:,} coordinates")
        for label, (fn, fn_args) in parts(seeds, n).items():
            if args.only and not label.startswith(tuple(args.only)):
                continue
            seconds = median_seconds(fn, fn_args, args.repeats)
            rows[label] = {"median_us": round(seconds * 1e6, 1), "ns_per_coordinate": round(seconds * 1e9 / total, 2),
                           "load_average": round(os.getloadavg()[0], 2)}
            print(f"  {label:<36}{seconds * 1e6:>10.0f} µs{seconds * 1e9 / total:>9.1f} ns/coord")
        results[shape] = {"seeds": seeds, "coordinates_per_seed": n, "parts": rows}
    write_report(args.output, {
        "benchmark": "kernel_parts",
        "description": "median time of each part of the learned optimizers' network, jitted alone, "
                       "on all coordinates of the shape (feature-major)",
        "repeats": args.repeats, "commit": git_commit(), **machine_info(), "results": results,
    })


if __name__ == "__main__":
    main()
