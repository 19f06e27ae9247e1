"""Drop-in cost: PureJaxRL-shaped PPO on CartPole-v1 with Adam, then with a learned optimizer.

The training loop is PureJaxRL's ``ppo.py`` (Lu et al. 2022) in compact form: gymnax CartPole-v1,
4 parallel environments, 128-step rollouts, 4 epochs of 4 minibatches, a 64-64 tanh actor-critic,
GAE, clipped surrogate, global-norm clip 0.5 chained before the optimizer, linearly annealed step
size 2.5e-4, orthogonal init (flax's values, through ``optim4rl.agents.networks.orthogonal``, which
avoids a jaxlib CPU deadlock of batched QRs under vmap: docs/known_problems.md); the whole run is one ``lax.scan`` inside one ``jit``, vmapped over 4 seeds. The only
difference between the two runs is the optimizer line: ``optax.adam(lr)`` or
``make_optimizer("optim4rl:grid6", lr)``. Where the fused CPU kernel is built, a third run uses
the learned optimizer with its network as plain JAX (``optim4rl.optimizers.native``).

Compilation is done first (``jit(...).lower(...).compile()``); the run phase, the compiled
program's execution, is timed alone. The optimizers alternate (A, B, A, B ...) so that both see
the same load; medians are reported with their ratio, and the optimizer state's floats and
bytes per parameter coordinate. Writes ``benchmarks/results/dropin_ppo.json``.

    python benchmarks/dropin_ppo.py [--steps 200000] [--seeds 4] [--repeats 3]
        [--learned optim4rl:grid6] [--run-timeout 900] [--output PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import statistics
import sys
import time
from typing import NamedTuple

import flax.linen as nn
import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import git_commit, machine_info, watchdog, write_report  # noqa: E402

from optim4rl.agents.networks import orthogonal  # noqa: E402
from optim4rl.optimizers import native  # noqa: E402

import optim4rl  # noqa: E402

NUM_ENVS = 4
NUM_STEPS = 128
UPDATE_EPOCHS = 4
NUM_MINIBATCHES = 4
GAMMA, GAE_LAMBDA, CLIP_EPS, ENT_COEF, VF_COEF = 0.99, 0.95, 0.2, 0.01, 0.5
MAX_GRAD_NORM = 0.5
LEARNING_RATE = 2.5e-4


class ActorCritic(nn.Module):
    num_actions: int

    @nn.compact
    def __call__(self, x):
        init = orthogonal  # flax's orthogonal init, safe under vmap on a CPU (known_problems.md)
        actor = nn.tanh(nn.Dense(64, kernel_init=init(np.sqrt(2)))(x))
        actor = nn.tanh(nn.Dense(64, kernel_init=init(np.sqrt(2)))(actor))
        logits = nn.Dense(self.num_actions, kernel_init=init(0.01))(actor)
        critic = nn.tanh(nn.Dense(64, kernel_init=init(np.sqrt(2)))(x))
        critic = nn.tanh(nn.Dense(64, kernel_init=init(np.sqrt(2)))(critic))
        value = nn.Dense(1, kernel_init=init(1.0))(critic)
        return logits, value[..., 0]


class Transition(NamedTuple):
    done: jax.Array
    action: jax.Array
    value: jax.Array
    reward: jax.Array
    log_prob: jax.Array
    obs: jax.Array


def make_train(total_steps: int, make_tx):
    """PureJaxRL's ``make_train``: a pure ``train(key)`` whose whole loop is one ``lax.scan``."""
    num_updates = total_steps // NUM_STEPS // NUM_ENVS
    minibatch_size = NUM_ENVS * NUM_STEPS // NUM_MINIBATCHES
    env, env_params = gymnax.make("CartPole-v1")
    network = ActorCritic(env.action_space(env_params).n)

    def schedule(count):
        updates_done = count // (NUM_MINIBATCHES * UPDATE_EPOCHS)
        return LEARNING_RATE * (1.0 - updates_done / num_updates)

    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), make_tx(schedule))

    def log_prob_of(logits, action):
        return jnp.take_along_axis(jax.nn.log_softmax(logits), action[..., None], -1)[..., 0]

    def train(key):
        key, init_key, reset_key = jax.random.split(key, 3)
        params = network.init(init_key, jnp.zeros(env.observation_space(env_params).shape))
        opt_state = tx.init(params)
        obs, env_state = jax.vmap(env.reset, (0, None))(jax.random.split(reset_key, NUM_ENVS),
                                                       env_params)

        def env_step(carry, _):
            params, env_state, obs, key = carry
            key, action_key, step_key = jax.random.split(key, 3)
            logits, value = network.apply(params, obs)
            action = jax.random.categorical(action_key, logits)
            obs_next, env_state, reward, terminated, truncated, _ = jax.vmap(
                env.step, (0, 0, 0, None))(jax.random.split(step_key, NUM_ENVS), env_state,
                                           action, env_params)
            done = jnp.logical_or(terminated, truncated)  # PureJaxRL's `done`
            transition = Transition(done, action, value, reward, log_prob_of(logits, action), obs)
            return (params, env_state, obs_next, key), transition

        def loss_fn(params, batch, advantages, targets):
            logits, value = network.apply(params, batch.obs)
            log_prob = log_prob_of(logits, batch.action)
            value_clipped = batch.value + jnp.clip(value - batch.value, -CLIP_EPS, CLIP_EPS)
            value_loss = 0.5 * jnp.maximum(jnp.square(value - targets),
                                           jnp.square(value_clipped - targets)).mean()
            ratio = jnp.exp(log_prob - batch.log_prob)
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            actor_loss = -jnp.minimum(ratio * advantages,
                                      jnp.clip(ratio, 1 - CLIP_EPS, 1 + CLIP_EPS) * advantages).mean()
            probs = jax.nn.softmax(logits)
            entropy = -jnp.sum(probs * jax.nn.log_softmax(logits), -1).mean()
            return actor_loss + VF_COEF * value_loss - ENT_COEF * entropy

        def update_step(carry, _):
            params, opt_state, env_state, obs, key = carry
            (params, env_state, obs, key), traj = jax.lax.scan(
                env_step, (params, env_state, obs, key), None, NUM_STEPS)
            _, last_value = network.apply(params, obs)

            def gae_step(carry, t):
                gae, next_value = carry
                delta = t.reward + GAMMA * next_value * (1 - t.done) - t.value
                gae = delta + GAMMA * GAE_LAMBDA * (1 - t.done) * gae
                return (gae, t.value), gae

            _, advantages = jax.lax.scan(gae_step, (jnp.zeros_like(last_value), last_value),
                                         traj, reverse=True)
            targets = advantages + traj.value

            def epoch(carry, _):
                params, opt_state, key = carry
                key, perm_key = jax.random.split(key)
                data = jax.tree.map(lambda x: x.reshape((NUM_STEPS * NUM_ENVS,) + x.shape[2:]),
                                    (traj, advantages, targets))
                perm = jax.random.permutation(perm_key, NUM_STEPS * NUM_ENVS)
                data = jax.tree.map(lambda x: x[perm].reshape((NUM_MINIBATCHES, minibatch_size)
                                                              + x.shape[1:]), data)

                def minibatch(carry, mb):
                    params, opt_state = carry
                    grads = jax.grad(loss_fn)(params, *mb)
                    updates, opt_state = tx.update(grads, opt_state, params)
                    return (optax.apply_updates(params, updates), opt_state), None

                (params, opt_state), _ = jax.lax.scan(minibatch, (params, opt_state), data)
                return (params, opt_state, key), None

            (params, opt_state, key), _ = jax.lax.scan(epoch, (params, opt_state, key), None,
                                                       UPDATE_EPOCHS)
            episode_end = traj.done.sum()
            return (params, opt_state, env_state, obs, key), (traj.reward.sum(), episode_end)

        (params, opt_state, *_), (rewards, episodes) = jax.lax.scan(
            update_step, (params, opt_state, env_state, obs, key), None, num_updates)
        # Mean episode return over the last tenth of training (rewards per finished episode).
        tail = max(num_updates // 10, 1)
        score = rewards[-tail:].sum() / jnp.maximum(episodes[-tail:].sum(), 1)
        return params, opt_state, score

    return train, network, tx


def state_floats_per_coordinate(tx, params) -> float:
    """Optimizer-state floats per parameter coordinate (step counters and scalars excluded)."""
    state = jax.eval_shape(tx.init, params)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    floats = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(state)
                 if jnp.issubdtype(s.dtype, jnp.floating) and len(s.shape) > 0)
    return floats / num_params


def state_bytes_per_coordinate(tx, params) -> float:
    """Bytes of the whole optimizer state (counters included) per parameter coordinate."""
    state = jax.eval_shape(tx.init, params)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(state)) / num_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--learned", default="optim4rl:grid6")
    parser.add_argument("--run-timeout", type=float, default=900.0,
                        help="seconds one run may take before the benchmark stops (default 900)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="override optim4rl.optimizers.base.CPU_BLOCK_SIZE (0: no blocking)")
    parser.add_argument("--output", type=pathlib.Path,
                        default=ROOT / "benchmarks" / "results" / "dropin_ppo.json")
    args = parser.parse_args()
    if args.block_size is not None:
        optim4rl.optimizers.base.CPU_BLOCK_SIZE = args.block_size

    learned_jax = f"{args.learned} (JAX network)"
    makers = {"adam": lambda lr: optax.adam(lr),
              args.learned: lambda lr: optim4rl.make_optimizer(args.learned, learning_rate=lr)}
    if args.learned.startswith("optim4rl") and native.status() == "native":
        # The same learned optimizer with its network as plain JAX: the fused kernel's gain.
        makers[learned_jax] = makers[args.learned]
    keys = jax.random.split(jax.random.key(0), args.seeds)
    compiled, compile_s, state_floats, state_bytes, num_params = {}, {}, {}, {}, None
    for label, make_tx in makers.items():
        train, network, tx = make_train(args.steps, make_tx)
        start = time.perf_counter()
        with native.disabled() if label == learned_jax else contextlib.nullcontext():
            compiled[label] = jax.jit(jax.vmap(train)).lower(keys).compile()
        compile_s[label] = time.perf_counter() - start
        env, env_params = gymnax.make("CartPole-v1")
        params = network.init(jax.random.key(0), jnp.zeros(env.observation_space(env_params).shape))
        num_params = sum(int(p.size) for p in jax.tree.leaves(params))
        state_floats[label] = state_floats_per_coordinate(tx, params)
        state_bytes[label] = round(state_bytes_per_coordinate(tx, params), 3)

    times = {label: [] for label in makers}
    loads = []
    scores = {}
    for _ in range(args.repeats):
        for label in makers:
            start = time.perf_counter()
            with watchdog(args.run_timeout, f"the {label} run"):
                _, _, score = jax.block_until_ready(compiled[label](keys))
            times[label].append(time.perf_counter() - start)
            loads.append(os.getloadavg()[0])
            scores[label] = [round(float(s), 1) for s in np.asarray(score)]
    median = {label: statistics.median(t) for label, t in times.items()}
    ratio = median[args.learned] / median["adam"]
    pair_ratios = [b / a for a, b in zip(times["adam"], times[args.learned])]

    report = {
        "benchmark": "dropin_ppo",
        "description": "PureJaxRL-shaped PPO on CartPole-v1, seeds vmapped, whole loop in one jit; "
                       "run-phase wall time (compiled program only), optimizers alternating",
        "total_steps": args.steps, "seeds": args.seeds, "repeats": args.repeats,
        "num_params": num_params,
        "cpu_block_size": optim4rl.optimizers.base.CPU_BLOCK_SIZE,
        "commit": git_commit(),
        **machine_info(),
        "load_average_during": [round(x, 2) for x in loads],
        "run_s": {label: [round(x, 3) for x in t] for label, t in times.items()},
        "median_run_s": {label: round(m, 3) for label, m in median.items()},
        "compile_s": {label: round(s, 1) for label, s in compile_s.items()},
        "ratio_learned_to_adam": round(ratio, 2),
        "ratio_learned_jax_network_to_adam": (round(median[learned_jax] / median["adam"], 2)
                                              if learned_jax in median else None),
        "pair_ratios": [round(r, 2) for r in pair_ratios],
        "state_floats_per_coordinate": state_floats,
        "state_bytes_per_coordinate": state_bytes,
        "final_return": scores,
    }
    print(f"PPO CartPole-v1, {args.seeds} seeds vmapped, {args.steps:,} steps, {num_params:,} "
          f"parameters, {report['device']}, load {min(loads):.1f}-{max(loads):.1f}")
    for label in makers:
        print(f"  {label:<18} run {median[label]:7.2f} s (median of {args.repeats}), compile "
              f"{compile_s[label]:5.1f} s, state {state_floats[label]:.0f} floats "
              f"({state_bytes[label]:.1f} bytes)/coordinate, "
              f"return {np.mean(scores[label]):.1f}")
    print(f"  ratio {args.learned} / adam: {ratio:.2f}x (pairs: "
          f"{', '.join(f'{r:.2f}' for r in pair_ratios)})")
    if learned_jax in median:
        print(f"  ratio {learned_jax} / adam: {median[learned_jax] / median['adam']:.2f}x")
    write_report(args.output, report)


if __name__ == "__main__":
    main()
