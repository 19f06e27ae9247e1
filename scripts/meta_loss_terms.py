"""Which term of the pipeline's meta-loss decides the step size? A diagnostic for SPEC §2.

    python scripts/meta_loss_terms.py OPTIMIZER_FILE_OR_init [--env big_dense_long] [--envs 64]
        [--lr 3e-3] [--ages 0,5,25] [--agents 8] [--repeats 4]

For a population of fresh A2C agents trained with φ (from a `.o4r` file, a pretrained name, or
`init` for the untrained φ), it prints d(meta-loss)/d(log α) at several agent ages (in
meta-iterations of K = 4 updates), split into the three terms of the A2C loss the meta-loss is
made of: actor, 0.5·critic and −0.01·entropy. Each is the derivative, through the K inner updates
exactly as in `optim4rl.meta.pipeline`, of the loss on the next fresh rollout with respect to the
log of the agents' step size α; a positive value means that term of the meta-objective asks for
smaller steps. Mean ± standard error over agents × repeats (fresh rollouts each).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim4rl.agents import a2c
from optim4rl.meta import MetaConfig, MetaTask, MetaTrainer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("optimizer", help="a .o4r file, a pretrained name, or 'init'")
    p.add_argument("--env", default="big_dense_long")
    p.add_argument("--envs", type=int, default=64, help="environments per agent")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--ages", default="0,5,25", help="agent ages in meta-iterations, ascending")
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args(argv)
    init_from = None if args.optimizer == "init" else args.optimizer
    trainer = MetaTrainer(MetaConfig(tasks=(MetaTask(args.env, 1.0, args.lr),), num_agents=args.agents,
                                     envs_per_agent=args.envs, reset_interval=1_000_000, init_from=init_from))
    setup = trainer.tasks[0]
    state = trainer.init(jax.random.key(0))
    phi, pop = state.phi, state.populations[0]
    cfg, acfg, net, env = trainer.cfg, setup.agent_config, setup.network, setup.env

    def terms(log_lr, agent, key):
        tx = trainer.opt.transform(phi, learning_rate=jnp.exp(log_lr), grad_clip=cfg.grad_clip)
        keys = jax.random.split(key, cfg.inner_updates + 1)

        def inner(carry, k):
            params, opt_state, env_state, obs = carry
            frozen = jax.lax.stop_gradient(params)
            env_state, next_obs, traj = a2c.rollout(k, net, frozen, env, env_state, obs, cfg.rollout_length)
            grads = jax.grad(lambda q: a2c.a2c_loss(q, net, traj, next_obs, acfg)[0])(frozen)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, env_state, next_obs), None

        carry = (agent.params, agent.opt_state, agent.env_state, agent.obs)
        (params, _, env_state, obs), _ = jax.lax.scan(inner, carry, keys[:-1])
        env_state, next_obs, traj = a2c.rollout(keys[-1], net, jax.lax.stop_gradient(params), env, env_state,
                                                obs, cfg.rollout_length)
        _, aux = a2c.a2c_loss(params, net, traj, next_obs, acfg)
        return jnp.stack([aux["actor_loss"], acfg.value_coef * aux["value_loss"],
                          -acfg.entropy_coef * aux["entropy"]])

    n = len(setup.offsets)
    jac = jax.jit(lambda pop, key: jax.vmap(jax.jacobian(terms), in_axes=(None, 0, 0))(
        jnp.log(args.lr), pop, jax.random.split(key, n)))
    advance = jax.jit(lambda pop, key: jax.vmap(lambda a, k: trainer.agent_meta_loss(phi, a, k, setup)[1][0])(
        pop, jax.random.split(key, n)))
    print(f"# {args.optimizer} on {args.env}, {args.agents} agents x {args.envs} envs, α = {args.lr:g}: "
          f"d(meta-loss)/d(log α) by term (positive: asks for smaller steps)")
    age, key = 0, jax.random.key(1)
    for target in (int(a) for a in args.ages.split(",")):
        while age < target:
            key, k = jax.random.split(key)
            pop = advance(pop, k)
            age += 1
        g = np.concatenate([np.asarray(jax.device_get(jac(pop, jax.random.key(100 + i)))) for i in range(args.repeats)])
        mean, se = g.mean(0), g.std(0) / np.sqrt(len(g))
        cells = "  ".join(f"{name} {m:+.1e} ± {s:.0e}" for name, m, s in
                          zip(("actor", "0.5·critic", "−0.01·entropy"), mean, se))
        print(f"age {age * cfg.inner_updates:4d} updates | {cells}", flush=True)


if __name__ == "__main__":
    main()
