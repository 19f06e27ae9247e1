"""A2C training throughput: env steps per second of the jitted, seed-vmapped training loop.

Times ``jax.vmap(A2CTrain.run_chunk)`` (``--updates`` updates inside one ``lax.scan``) for each
``--envs`` task and ``--seeds`` count, after a first chunk that compiles. ``--flax-conv`` swaps the
big-gridworld torso's :class:`PatchConv` back to ``flax.linen.Conv`` (same parameters and
function) to measure why the patch form exists: XLA's CPU backend runs a convolution inside a
scan body several times slower than outside one.

    python benchmarks/a2c_throughput.py [--envs big_dense_long,small_dense_long,catch]
        [--seeds 1,5] [--optimizer adam] [--updates 10] [--flax-conv] [--output PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(env: str, seeds: int, optimizer: str, updates: int) -> dict:
    import jax

    from optim4rl import make_optimizer
    from optim4rl.agents import a2c

    cfg = a2c.A2CConfig.cpu(env, updates_per_chunk=updates)
    train = a2c.make_train(cfg, make_optimizer(optimizer, learning_rate=3e-3, grad_clip=1.0))
    init = jax.jit(jax.vmap(train.init))
    chunk = jax.jit(jax.vmap(train.run_chunk))
    state = init(jax.random.split(jax.random.key(0), seeds))
    t0 = time.time()
    state, _ = chunk(state)
    jax.block_until_ready(state)
    compile_s = time.time() - t0
    times = []
    for _ in range(3):
        t0 = time.time()
        state, _ = chunk(state)
        jax.block_until_ready(state)
        times.append(time.time() - t0)
    best = min(times)
    steps = seeds * updates * cfg.num_envs * cfg.rollout_length
    return {"env": env, "seeds": seeds, "optimizer": optimizer, "num_envs": cfg.num_envs,
            "updates_per_chunk": updates, "compile_and_first_chunk_s": round(compile_s, 2),
            "ms_per_update_best": round(best / updates * 1e3, 2), "steps_per_s_best": round(steps / best, 1),
            "steps_per_s_median": round(steps / sorted(times)[1], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="big_dense_long,small_dense_long,catch")
    parser.add_argument("--seeds", default="1,5")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--flax-conv", action="store_true", help="use flax.linen.Conv (the slow form)")
    parser.add_argument("--output", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if args.flax_conv:
        import flax.linen as nn

        from optim4rl.agents import networks

        networks.PatchConv = lambda features, kernel_size: nn.Conv(features, kernel_size)
    import jax

    results = [measure(env, int(s), args.optimizer, args.updates)
               for env in args.envs.split(",") for s in args.seeds.split(",")]
    print(f"A2C throughput, {jax.devices()[0].platform}, optimizer {args.optimizer}, "
          f"conv {'flax.linen.Conv' if args.flax_conv else 'PatchConv'}")
    print(f"{'env':20s} {'seeds':>5s} {'ms/update':>10s} {'steps/s':>10s} {'compile s':>10s}")
    for r in results:
        print(f"{r['env']:20s} {r['seeds']:5d} {r['ms_per_update_best']:10.1f} {r['steps_per_s_best']:10.0f} "
              f"{r['compile_and_first_chunk_s']:10.1f}")
    output = args.output or ROOT / "benchmarks" / "results" / (
        "a2c_throughput" + ("_flax_conv" if args.flax_conv else "") + ".json")
    output.write_text(json.dumps({"benchmark": "a2c_throughput", "flax_conv": args.flax_conv,
                                  "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
                                  "jax_version": jax.__version__, "results": results}, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
