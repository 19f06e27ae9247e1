"""Pipeline meta-training of Optim4RL on noisy quadratics: a one-minute model of the RL setting.

    python scripts/noisy_quadratic_pipeline.py [--agents 16] [--inner 4] [--reset 36]
        [--iterations 600] [--normalize {task,agent}] [--set KEY=VALUE ...] [--seed 0]

Every agent owns a quadratic over N coordinates, ``L(w) = Σ c_i (½ (w_i − t_i)² + ρ_i ξ_i w_i)``
with curvatures c spread over five orders of magnitude, targets t ~ N(0, 1), and a noise level
ρ_i ∈ {0, 1, 10}; a fresh ξ ~ N(0, 1) is drawn for every gradient and for the meta-loss, so the
gradient is ``c (w − t) + c ρ ξ``. Meta-training follows `optim4rl.meta.pipeline` exactly in
structure (docs/paper_settings.md §2): a population of agents with staggered resets, K updates per meta-iteration
with stop-gradient inputs, the (stochastic) loss after them as the meta-loss, the meta-gradient
rescaled to norm 0.5, Adam 1e-3 on φ. Like an RL loss, the meta-loss is dominated by the
coordinates with large curvature and by young agents, whose loss is largest.

It prints, for Adam, the untrained φ and the trained φ, the error of fresh agents trained for
one lifetime (K x reset updates): the mean squared distance to the target per noise level, the
curvature-weighted loss averaged over the lifetime (what the pipeline optimises) and at its end;
then the trained optimizer's step response (`optim4rl inspect`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim4rl.analysis.response import format_relative, format_response, relative_response, step_response
from optim4rl.config import parse_override
from optim4rl.meta.pipeline import unit_norm_mean
from optim4rl.optimizers import Optim4RL, save

COORDINATES, STEP_SIZE, NOISE_LEVELS = 2048, 0.05, (0.0, 1.0, 10.0)


def problem(key):
    k_curv, k_target, k_noise = jax.random.split(key, 3)
    curvature = 10 ** jax.random.uniform(k_curv, (COORDINATES,), minval=-5, maxval=0)
    target = jax.random.normal(k_target, (COORDINATES,))
    rho = jnp.asarray(NOISE_LEVELS)[jax.random.randint(k_noise, (COORDINATES,), 0, len(NOISE_LEVELS))]
    return curvature, target, rho


def stochastic_loss(w, prob, key):
    curvature, target, rho = prob
    xi = jax.random.normal(key, (COORDINATES,))
    return jnp.sum(curvature * (0.5 * (w - target) ** 2 + rho * xi * w))


def evaluate(tx, lifetime: int, seeds: int = 4) -> np.ndarray:
    """[error at ρ=0, ρ=1, ρ=10, lifetime-mean weighted loss, final weighted loss], seed means."""

    def run(key):
        k_prob, k_noise = jax.random.split(key)
        prob = problem(k_prob)
        curvature, target, rho = prob
        params = {"w": jnp.zeros(COORDINATES)}

        def body(carry, k):
            params, state = carry
            g = jax.grad(stochastic_loss)(params["w"], prob, k)
            updates, state = tx.update({"w": g}, state, params)
            params = optax.apply_updates(params, updates)
            return (params, state), jnp.sum(curvature * 0.5 * (params["w"] - target) ** 2)

        (params, _), weighted = jax.lax.scan(body, (params, tx.init(params)),
                                             jax.random.split(k_noise, lifetime))
        err = (params["w"] - target) ** 2
        per_level = [jnp.sum(jnp.where(rho == r, err, 0)) / jnp.maximum(jnp.sum(rho == r), 1)
                     for r in NOISE_LEVELS]
        return jnp.stack([*per_level, jnp.mean(weighted), weighted[-1]])

    return np.asarray(jnp.mean(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(123), seeds)), 0))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--inner", type=int, default=4, help="inner updates K per meta-iteration")
    parser.add_argument("--reset", type=int, default=36, help="reset interval in meta-iterations")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--normalize", choices=("task", "agent"), default="task")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an Optim4RL field, e.g. log_scale=0.1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    options = {}
    for text in args.set:
        keys, value = parse_override(text)
        options[keys[0]] = value
    opt = Optim4RL(**options)
    P, K, R = args.agents, args.inner, args.reset

    def init_agent(phi, key):
        tx = opt.transform(phi, learning_rate=STEP_SIZE)
        params = {"w": jnp.zeros(COORDINATES)}
        return problem(key), params, tx.init(params)

    def agent_meta_loss(phi, agent, key):
        prob, params, state = agent
        tx = opt.transform(phi, learning_rate=STEP_SIZE)
        keys = jax.random.split(key, K + 1)

        def inner(carry, k):
            params, state = carry
            g = jax.grad(stochastic_loss)(jax.lax.stop_gradient(params["w"]), prob, k)
            updates, state = tx.update({"w": g}, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, state), _ = jax.lax.scan(inner, (params, state), keys[:-1])
        return stochastic_loss(params["w"], prob, keys[-1]), jax.lax.stop_gradient((prob, params, state))

    offsets = jnp.asarray(np.linspace(0, R - 1, P).astype(np.int32))
    key = jax.random.key(args.seed)
    k_phi, k_pop, key = jax.random.split(key, 3)
    phi = opt.init_meta(k_phi)
    phi0 = phi
    meta_tx = optax.adam(1e-3)
    meta_state = meta_tx.init(phi)
    pop = jax.vmap(init_agent, (None, 0))(phi, jax.random.split(k_pop, P))

    @jax.jit
    def meta_step(phi, meta_state, pop, t, key):
        k_reset, k_meta = jax.random.split(key)
        fresh = jax.vmap(init_agent, (None, 0))(phi, jax.random.split(k_reset, P))
        reset = (t % R) == offsets
        pop = jax.tree.map(lambda f, o: jnp.where(reset.reshape((-1,) + (1,) * (f.ndim - 1)), f, o), fresh, pop)
        keys = jax.random.split(k_meta, P)
        if args.normalize == "agent":
            grad_fn = jax.vmap(jax.value_and_grad(agent_meta_loss, has_aux=True), (None, 0, 0))
            (losses, pop), grads = grad_fn(phi, pop, keys)
            grad = unit_norm_mean(grads)
            loss = jnp.mean(losses)
        else:
            def mean_loss(phi):
                losses, new = jax.vmap(agent_meta_loss, (None, 0, 0))(phi, pop, keys)
                return jnp.mean(losses), new

            (loss, pop), grad = jax.value_and_grad(mean_loss, has_aux=True)(phi)
        norm = optax.global_norm(grad)
        grad = jax.tree.map(lambda g: g * 0.5 / (norm + 1e-12), grad)
        updates, meta_state = meta_tx.update(grad, meta_state, phi)
        return optax.apply_updates(phi, updates), meta_state, pop, loss

    start = time.time()
    for t in range(args.iterations):
        key, k_step = jax.random.split(key)
        phi, meta_state, pop, loss = meta_step(phi, meta_state, pop, t, k_step)
    print(f"meta-trained {args.iterations} iterations ({P} agents, K={K}, reset {R}, "
          f"{args.normalize} normalisation, {options or 'paper'} φ) in {time.time() - start:.0f}s")

    lifetime = K * R
    header = "| optimizer | error ρ=0 | error ρ=1 | error ρ=10 | weighted loss, lifetime mean | at the end |"
    print(f"\nfresh agents trained {lifetime} updates (one lifetime), α={STEP_SIZE}, 4 seeds\n")
    print(header + "\n|---|---|---|---|---|---|")
    rows = {"adam": optax.adam(STEP_SIZE), "optim4rl (untrained φ)": opt.transform(phi0, STEP_SIZE),
            "optim4rl (meta-trained)": opt.transform(phi, STEP_SIZE)}
    for name, tx in rows.items():
        values = evaluate(tx, lifetime)
        print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in values) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trained.o4r"
        save(path, opt, phi, info={"note": "noisy_quadratic_pipeline.py"})
        result = step_response(f"optim4rl:{path}", magnitudes=(1e-6, 1e-4, 1e-2, 1.0), flip_probs=(0.0, 0.5))
        relative = relative_response(f"optim4rl:{path}")
    result["spec"] = relative["spec"] = "optim4rl (meta-trained)"
    print("\n" + format_response(result))
    print("\n" + format_relative(relative))


if __name__ == "__main__":
    main()
