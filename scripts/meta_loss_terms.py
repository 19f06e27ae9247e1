"""Which term of the pipeline's meta-loss decides the step size? A diagnostic for docs/paper_settings.md §2.

    python scripts/meta_loss_terms.py OPTIMIZER_FILE_OR_init [--env big_dense_long] [--envs 64]
        [--lr 3e-3] [--ages 0,5,25] [--agents 8] [--repeats 4]

For a population of fresh A2C agents trained with φ (from a `.o4r` file, a pretrained name, or
`init` for the untrained φ), it prints d(meta-loss)/d(log α) at several agent ages (in
meta-iterations of K = 4 updates), split into the three terms of the A2C loss the meta-loss is
made of: actor, 0.5·critic and −0.01·entropy. Each is the derivative, through the K inner updates
of `optim4rl.meta.pipeline.MetaTrainer.agent_meta_loss` itself, of the loss on the next fresh rollout with respect to the
log of the agents' step size α; a positive value means that term of the meta-objective asks for
smaller steps. Mean ± standard error over agents × repeats (fresh rollouts each).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

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
    cfg = trainer.cfg

    def terms(log_lr, agent, key):
        # The pipeline's own inner loop and meta-loss, with the step size as a traced input.
        _, (_, monitors) = trainer.agent_meta_loss(phi, agent, key, setup, learning_rate=jnp.exp(log_lr))
        return jnp.stack([monitors["loss_actor"], monitors["loss_critic"], monitors["loss_entropy"]])

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
