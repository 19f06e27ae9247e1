"""Pipeline meta-training of a learned optimizer (Optim4RL paper §4.3, docs/paper_settings.md §2).

Pure functions over explicit state, so that a whole chunk of meta-iterations is one jitted
`lax.scan`:

* `Population`: per task, `n` agents stacked on a leading axis (parameters, learned-optimizer
  state, environments, age), laid out over all devices by `optim4rl.parallel`.
* `reset_offsets`: the staggered reset schedule; `reset_population` re-initialises the agents whose
  turn it is (fresh parameters, zero recurrent state, fresh environments).
* `agent_meta_loss`: K inner updates `θ ← θ + U_φ(g)`, each on a fresh rollout, then the A2C loss
  of the updated θ on one more rollout. Gradients g are stop-gradient inputs of the optimizer, so the
  meta-gradient has no second-order terms but does flow through every update and recurrent state.
  With ``agent = "ppo"`` (MetaPPO) an inner update is one PPO training step (epochs × minibatches
  of U_φ on a fresh batch, `PPOTrain.sgd`) and the meta-loss is `ppo.ppo_loss` on one more batch;
  the agents also carry their observation normaliser. The schedule, resets, NaN handling,
  meta-gradient processing, sharding and checkpoints are the same code for both algorithms.
* `meta_step`: per task the mean meta-gradient over agents (optionally of unit-norm per-agent
  meta-gradients), rescaled to a fixed norm; mean over tasks; a non-finite meta-gradient skips the update; Adam on φ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim4rl.errors import ConfigError
from optim4rl.meta.config import MetaConfig, MetaTask

Array = jax.Array


class AgentState(NamedTuple):
    params: Any
    opt_state: Any
    env_state: Any
    obs: Array
    age: Array  # meta-iterations since the last reset
    last_return: Array  # return of the most recent finished episode (NaN before the first)
    # PPO's running observation statistics (None for A2C: no leaves, so A2C checkpoints keep
    # their layout).
    normalizer: Any = None


class MetaState(NamedTuple):
    phi: Any
    meta_opt_state: Any
    populations: tuple  # one stacked AgentState per task
    iteration: Array
    key: Array
    skipped: Array  # meta-updates skipped because of a non-finite meta-gradient


def reset_offsets(num_agents: int, reset_interval: int) -> np.ndarray:
    """Agent j resets when `t % reset_interval == offsets[j]` (docs/paper_settings.md §2)."""
    return np.linspace(0, reset_interval - 1, num_agents).astype(np.int32)


class TaskSetup(NamedTuple):
    """Static pieces of one task (hashable: closed over by jit)."""

    task: MetaTask
    env: Any
    network: Any
    agent_config: Any  # A2CConfig with the task's reward scale, or the task's PPOConfig
    offsets: np.ndarray
    reset_interval: int
    trainer: Any = None  # PPO: the PPOTrain whose collect/observe/sgd the inner step reuses


def build_task(cfg: MetaConfig, task: MetaTask) -> TaskSetup:
    from optim4rl import envs
    from optim4rl.agents import a2c, networks, ppo

    interval = cfg.task_reset_interval(task)
    offsets = reset_offsets(cfg.task_num_agents(task), interval)
    if cfg.agent == "ppo":
        agent_config = cfg.ppo_config(task)
        env = envs.make(task.env, **dict(agent_config.env_kwargs))
        trainer = ppo.make_train(agent_config, None, env=env)
        return TaskSetup(task, env, trainer.network, agent_config, offsets, interval, trainer)
    env = envs.make(task.env)
    agent_config = a2c.A2CConfig.cpu(task.env)
    agent_config = dataclasses.replace(
        agent_config, env=task.env, num_envs=cfg.envs_per_agent,
        rollout_length=cfg.rollout_length, reward_scale=task.reward_scale,
    )
    return TaskSetup(task, env, networks.make_network(env, agent_config.conv_layout), agent_config, offsets,
                     interval)


# "auto" rematerialisation keeps the K updates' residuals when their estimate fits in this
# fraction of the device's memory (the rest holds the populations, rollouts and XLA's buffers).
REMAT_MEMORY_FRACTION = 0.25


def device_memory_bytes() -> int:
    """The first device's memory: its allocator limit (GPU), else the machine's physical RAM."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    import os
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MetaTrainer:
    """Builds the jitted pieces of pipeline meta-training for a `MetaConfig`."""

    def __init__(self, cfg: MetaConfig):
        from optim4rl import optimizers

        self.cfg = cfg
        from optim4rl.optimizers.registry import CONFIGURATIONS, resolve_configuration

        # A named configuration ("rlc2024") is its architecture with fixed fields, under the options.
        arch, fields = resolve_configuration(cfg.optimizer)
        if arch not in optimizers.LEARNED:
            raise ConfigError(
                f"unknown learned optimizer {cfg.optimizer!r}; known: "
                f"{', '.join([*optimizers.LEARNED, *CONFIGURATIONS])}"
            )
        from optim4rl import config as config_lib

        # Strict: an unknown or ill-typed architecture field is one line, not a TypeError.
        self.opt = config_lib.from_dict(optimizers.LEARNED[arch], {**fields, **dict(cfg.optimizer_options)},
                                        "optimizer_options")
        self.init_phi = None
        if cfg.init_from:
            opt, self.init_phi, _ = optimizers.learned_from_spec(f"{cfg.optimizer}:{cfg.init_from}")
            if (cfg.optimizer_options or fields) and opt != self.opt:
                raise ConfigError(f"init_from {cfg.init_from}: the file's architecture {opt.config()} "
                                  f"differs from optimizer_options {dict(cfg.optimizer_options)}")
            self.opt = opt
        self.tasks = tuple(build_task(cfg, t) for t in cfg.tasks)
        self.remat_estimate_bytes = sum(self.unrematerialised_bytes(setup) for setup in self.tasks)
        self.remat = cfg.remat
        if cfg.remat == "auto":
            budget = REMAT_MEMORY_FRACTION * device_memory_bytes()
            self.remat = "none" if self.remat_estimate_bytes <= budget else "full"
        meta_tx = []
        if cfg.meta_grad_clip:
            meta_tx.append(optax.clip(cfg.meta_grad_clip))
        if cfg.meta_global_clip:
            meta_tx.append(optax.clip_by_global_norm(cfg.meta_global_clip))
        meta_tx.append(optax.adam(cfg.meta_learning_rate))
        self.meta_tx = optax.chain(*meta_tx)

    # --- agents ---------------------------------------------------------------------------
    def _tx(self, phi, setup: TaskSetup, learning_rate=None):
        lr = setup.task.learning_rate if learning_rate is None else learning_rate
        return self.opt.transform(phi, learning_rate=lr, grad_clip=self.cfg.grad_clip or None)

    def init_agent(self, key, phi, setup: TaskSetup) -> AgentState:
        from optim4rl.agents import networks, running_statistics

        param_key, env_key = jax.random.split(key)
        env_keys = jax.random.split(env_key, self.cfg.envs_per_agent)
        env_state, obs = jax.vmap(setup.env.reset)(env_keys)
        params = networks.init_params(setup.network, param_key, setup.env.observation_shape)
        opt_state = self._tx(phi, setup).init(params)
        normalizer = running_statistics.init(setup.env.observation_shape) if setup.trainer else None
        return AgentState(params, opt_state, env_state, obs, jnp.int32(0), jnp.float32(jnp.nan), normalizer)

    def init_population(self, key, phi, setup: TaskSetup) -> AgentState:
        keys = jax.random.split(key, len(setup.offsets))
        return jax.vmap(lambda k: self.init_agent(k, phi, setup))(keys)

    def init(self, key=None) -> MetaState:
        key = jax.random.key(self.cfg.seed) if key is None else key
        key, phi_key, *pop_keys = jax.random.split(key, 2 + len(self.tasks))
        phi = self.opt.init_meta(phi_key) if self.init_phi is None else self.init_phi
        pops = tuple(self.init_population(k, phi, s) for k, s in zip(pop_keys, self.tasks))
        state = MetaState(phi, self.meta_tx.init(phi), pops, jnp.int32(0), key, jnp.int32(0))
        # One buffer per leaf (a Brax env state holds its episode's first state as the same
        # arrays), so that the jitted chunk may donate the whole state.
        return jax.tree.map(jnp.copy, state)

    def reset_population(self, key, phi, pop: AgentState, setup: TaskSetup, iteration) -> tuple[AgentState, Array]:
        """Re-initialises scheduled agents (and any whose parameters became non-finite)."""
        fresh = self.init_population(key, phi, setup)
        finite = jax.vmap(
            lambda p: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)]))
        )(pop.params)
        if self.cfg.pipeline:
            scheduled = (iteration % setup.reset_interval) == jnp.asarray(setup.offsets)
        else:
            scheduled = jnp.zeros(len(setup.offsets), bool)
        reset = scheduled | ~finite

        def select(new, old):
            mask = reset.reshape((-1,) + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        pop = jax.tree.map(select, fresh, pop)
        return pop, jnp.sum(~finite)

    def unrematerialised_bytes(self, setup: TaskSetup) -> int:
        """Memory the backward pass keeps for one task's population without rematerialisation.

        The residuals of one agent's ``tx.update`` with respect to φ (what autodiff saves, so the
        platform's blocking of the optimizer network is accounted for), times K, times the
        agents. The rollouts and agent gradients are constants for the meta-gradient (they read
        stop-gradient parameters), so they keep nothing.
        """
        from jax._src.ad_checkpoint import saved_residuals
        from optim4rl.agents import networks

        phi = jax.eval_shape(self.opt.init_meta, jax.random.key(0))
        params = jax.eval_shape(lambda k: networks.init_params(
            setup.network, k, setup.env.observation_shape), jax.random.key(0))

        def one_update(phi, grads, params):
            tx = self._tx(phi, setup)
            return tx.update(grads, tx.init(params), params)[0]

        residuals = saved_residuals(one_update, phi, params, params)
        per_update = sum(int(np.prod(aval.shape)) * aval.dtype.itemsize for aval, _ in residuals
                         if hasattr(aval, "shape"))
        updates = self.cfg.inner_updates
        if self.cfg.agent == "ppo":  # each inner step is epochs x minibatches optimizer updates
            updates *= setup.agent_config.num_updates_per_batch * setup.agent_config.num_minibatches
        return per_update * updates * len(setup.offsets)

    # --- the meta-objective ---------------------------------------------------------------
    def agent_meta_loss(self, phi, agent: AgentState, key, setup: TaskSetup, learning_rate=None):
        """K inner updates with U_φ, then the meta-loss of the updated agent on a fresh rollout.

        Dispatches on the agent (A2C here, PPO in :meth:`ppo_agent_meta_loss`).

        Returns ``(loss, (new_agent, monitors))``. ``monitors`` holds ``update_scale`` and
        ``zero_grad_fraction`` (means over the K updates, no gradient) and the three weighted terms
        of the A2C loss on the last rollout, ``loss_actor``, ``loss_critic`` (value_coef × value
        loss) and ``loss_entropy`` (−entropy_coef × entropy), which keep their dependence on φ and
        on ``learning_rate`` (default: the task's α; a traced value lets a caller differentiate
        each term with respect to the step size, as scripts/meta_loss_terms.py does).
        """
        if setup.trainer is not None:
            return self.ppo_agent_meta_loss(phi, agent, key, setup, learning_rate)
        from optim4rl.agents import a2c

        cfg, acfg, net, env = self.cfg, setup.agent_config, setup.network, setup.env
        task_lr = setup.task.learning_rate if learning_rate is None else learning_rate
        tx = self._tx(phi, setup, task_lr)
        keys = jax.random.split(key, cfg.inner_updates + 1)

        def inner_update(carry, k):
            params, opt_state, env_state, obs, last_return = carry
            frozen = jax.lax.stop_gradient(params)
            env_state, next_obs, traj = a2c.rollout(k, net, frozen, env, env_state, obs, cfg.rollout_length)
            # The optimizer's input is a constant for meta-differentiation (docs/paper_settings.md §1).
            grads = jax.grad(lambda p: a2c.a2c_loss(p, net, traj, next_obs, acfg)[0])(frozen)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            last_return = _latest_return(traj, last_return)
            # Monitoring only: the mean step |Δθ|/α over all coordinates, zero-gradient ones
            # included (Adam-like optimizers give much less than 1 on noisy gradients).
            scale = jax.lax.stop_gradient(_mean_abs(updates) / task_lr)
            # ... and the fraction of coordinates whose gradient is exactly zero: a learned
            # optimizer whose steps are too large kills the agent's ReLU units, and its
            # update_scale then falls because the dead coordinates get no step at all.
            zero = jax.lax.stop_gradient(_zero_fraction(grads))
            return (params, opt_state, env_state, next_obs, last_return), (scale, zero)

        if self.remat == "full":
            # Keep only each update's carry for the backward pass and recompute the update:
            # memory ~ O(coordinates x state) instead of O(coordinates x network) per update.
            inner_update = jax.checkpoint(inner_update)
        carry = (agent.params, agent.opt_state, agent.env_state, agent.obs, agent.last_return)
        carry, monitors = jax.lax.scan(inner_update, carry, keys[:-1])
        params, opt_state, env_state, obs, last_return = carry
        env_state, next_obs, traj = a2c.rollout(
            keys[-1], net, jax.lax.stop_gradient(params), env, env_state, obs, cfg.rollout_length)
        loss, aux = a2c.a2c_loss(params, net, traj, next_obs, acfg)
        if cfg.meta_loss == "actor":
            loss = aux["actor_loss"]
        last_return = _latest_return(traj, last_return)
        new_agent = AgentState(params, opt_state, env_state, next_obs, agent.age + 1, last_return)
        scale, zero = monitors
        monitors = {"update_scale": jnp.mean(scale), "zero_grad_fraction": jnp.mean(zero),
                    "loss_actor": aux["actor_loss"], "loss_critic": acfg.value_coef * aux["value_loss"],
                    "loss_entropy": -acfg.entropy_coef * aux["entropy"]}
        return loss, (jax.lax.stop_gradient(new_agent), monitors)

    def ppo_agent_meta_loss(self, phi, agent: AgentState, key, setup: TaskSetup, learning_rate=None):
        """MetaPPO: K PPO training steps with U_φ, then the PPO loss on one more fresh batch.

        Each inner step collects a fresh batch with the current parameters and observation
        statistics, updates the statistics with it and runs ``num_updates_per_batch`` epochs of
        ``num_minibatches`` steps of U_φ (:meth:`PPOTrain.sgd`, the trainer's own code). The
        meta-loss is :func:`ppo.ppo_loss` of the updated parameters on the last batch
        (:meth:`ppo_meta_loss`). Returns what :meth:`agent_meta_loss` returns; ``update_scale``
        is the net parameter change of an inner step per minibatch step, |Δθ| / (α · steps), and
        ``zero_grad_fraction`` is not measured (NaN).
        """
        cfg, pcfg, train = self.cfg, setup.agent_config, setup.trainer
        task_lr = setup.task.learning_rate if learning_rate is None else learning_rate
        tx = self._tx(phi, setup, task_lr)
        steps_per_batch = pcfg.num_updates_per_batch * pcfg.num_minibatches
        keys = jax.random.split(key, cfg.inner_updates + 1)

        def inner_step(carry, k):
            params, opt_state, normalizer, env_state, obs, last_return = carry
            collect_key, sgd_key = jax.random.split(k)
            env_state, obs, batch, data = train.collect(collect_key, params, normalizer, env_state, obs)
            normalizer = train.observe(normalizer, batch)
            # With remat, sgd keeps only each minibatch step's and epoch's carry for the backward
            # pass: memory grows with the optimizer's state, not with the network's activations.
            new_params, opt_state, _ = train.sgd(sgd_key, params, opt_state, normalizer, batch, tx=tx,
                                                 remat=self.remat == "full")
            moved = jax.tree.map(jnp.subtract, new_params, params)
            scale = jax.lax.stop_gradient(_mean_abs(moved) / (task_lr * steps_per_batch))
            last_return = _latest_return(_time_major(data), last_return)
            return (new_params, opt_state, normalizer, env_state, obs, last_return), scale

        carry = (agent.params, agent.opt_state, agent.normalizer, agent.env_state, agent.obs, agent.last_return)
        carry, scale = jax.lax.scan(inner_step, carry, keys[:-1])
        params, opt_state, normalizer, env_state, obs, last_return = carry
        collect_key, loss_key = jax.random.split(keys[-1])
        env_state, obs, batch, data = train.collect(collect_key, params, normalizer, env_state, obs)
        normalizer = train.observe(normalizer, batch)
        loss, aux = self.ppo_meta_loss(params, normalizer, batch, loss_key, setup)
        if cfg.meta_loss == "actor":
            loss = aux["policy_loss"]
        last_return = _latest_return(_time_major(data), last_return)
        new_agent = AgentState(params, opt_state, env_state, obs, agent.age + 1, last_return, normalizer)
        monitors = {"update_scale": jnp.mean(scale), "zero_grad_fraction": jnp.float32(jnp.nan),
                    "loss_actor": aux["policy_loss"], "loss_critic": aux["value_loss"],
                    "loss_entropy": -pcfg.entropy_cost * aux["entropy"]}
        return loss, (jax.lax.stop_gradient(new_agent), monitors)

    def ppo_meta_loss(self, params, normalizer, batch, key, setup: TaskSetup):
        """The PPO trainer's loss (:func:`ppo.ppo_loss`, with the task's PPOConfig) on a whole batch."""
        from optim4rl.agents import ppo

        train = setup.trainer
        return ppo.ppo_loss(params, train.network, train.dist, normalizer, batch, key, setup.agent_config)

    def task_meta_gradient(self, phi, pop: AgentState, key, setup: TaskSetup):
        keys = jax.random.split(key, len(setup.offsets))

        if self.cfg.meta_normalize == "agent":
            # One meta-gradient per agent (the backward pass already keeps per-agent copies of φ's
            # gradient), each scaled to unit norm before the mean.
            per_agent = jax.value_and_grad(self.agent_meta_loss, has_aux=True)
            (losses, (new_pop, monitors)), grads = jax.vmap(per_agent, in_axes=(None, 0, 0, None))(
                phi, pop, keys, setup)
            grad = unit_norm_mean(grads)
            loss, monitors = jnp.mean(losses), jax.tree.map(jnp.mean, monitors)
        else:
            def mean_loss(phi):
                losses, (new_pop, monitors) = jax.vmap(self.agent_meta_loss, in_axes=(None, 0, 0, None))(
                    phi, pop, keys, setup)
                return jnp.mean(losses), (new_pop, jax.tree.map(jnp.mean, monitors))

            (loss, (new_pop, monitors)), grad = jax.value_and_grad(mean_loss, has_aux=True)(phi)
        norm = optax.global_norm(grad)
        if self.cfg.meta_max_norm:
            # Normalised, not clipped: every task contributes a step of the same size (docs/paper_settings.md §2).
            grad = jax.tree.map(lambda g: g * (self.cfg.meta_max_norm / (norm + 1e-12)), grad)
        return grad, new_pop, loss, norm, monitors

    def meta_step(self, state: MetaState, _=None):
        cfg = self.cfg
        key, *task_keys = jax.random.split(state.key, 1 + 2 * len(self.tasks))
        grads, pops, metrics = [], [], {}
        for i, setup in enumerate(self.tasks):
            pop, nonfinite = self.reset_population(task_keys[2 * i], state.phi, state.populations[i], setup,
                                                   state.iteration)
            grad, pop, loss, norm, monitors = self.task_meta_gradient(
                state.phi, pop, task_keys[2 * i + 1], setup)
            grads.append(grad)
            pops.append(pop)
            name = setup.task.env
            metrics[f"meta_loss/{name}"] = loss
            metrics[f"meta_grad_norm/{name}"] = norm
            metrics[f"update_scale/{name}"] = monitors["update_scale"]
            metrics[f"zero_grad_fraction/{name}"] = monitors["zero_grad_fraction"]
            # The A2C loss's terms on the meta-loss rollout (whichever of them meta_loss uses).
            for term in ("actor", "critic", "entropy"):
                metrics[f"meta_loss_{term}/{name}"] = monitors[f"loss_{term}"]
            metrics[f"nonfinite_agents/{name}"] = nonfinite.astype(jnp.float32)
            metrics.update(_returns_by_age(pop, setup, cfg.age_bins, name))
        grad = jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0), *grads)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grad)]))
        safe_grad = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grad)
        updates, meta_opt_state = self.meta_tx.update(safe_grad, state.meta_opt_state, state.phi)
        new_phi = optax.apply_updates(state.phi, updates)
        # A non-finite meta-gradient never reaches φ: keep φ and the meta-optimizer state as they were.
        phi = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_phi, state.phi)
        meta_opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), meta_opt_state, state.meta_opt_state)
        metrics["meta_loss"] = jnp.mean(jnp.stack([metrics[f"meta_loss/{s.task.env}"] for s in self.tasks]))
        metrics["skipped_update"] = (~finite).astype(jnp.float32)
        new_state = MetaState(phi, meta_opt_state, tuple(pops), state.iteration + 1, key,
                              state.skipped + (~finite).astype(jnp.int32))
        return new_state, metrics

    def run_chunk(self, state: MetaState, length: int | None = None):
        """`length` meta-iterations (default cfg.iterations_per_chunk) in one `lax.scan`."""
        return jax.lax.scan(self.meta_step, state, None, length=length or self.cfg.iterations_per_chunk)

    def jitted_chunk(self, length: int | None = None):
        """`run_chunk` of `length` iterations under jit (the state donated), compiled once per
        trainer: runs that share a trainer (a stop and its resume, tests) reuse the executable."""
        length = length or self.cfg.iterations_per_chunk
        cache = self.__dict__.setdefault("_jitted_chunks", {})
        if length not in cache:
            cache[length] = jax.jit(lambda state: self.run_chunk(state, length), donate_argnums=0)
        return cache[length]


def unit_norm_mean(grads):
    """Mean over the leading axis of a stacked pytree of gradients, each first scaled to unit norm."""
    norms = jax.vmap(optax.global_norm)(grads)
    return jax.tree.map(lambda g: jnp.mean(g / (norms.reshape((-1,) + (1,) * (g.ndim - 1)) + 1e-12), axis=0),
                        grads)


def _time_major(data):
    """PPO's ``[unrolls, T, envs]`` transitions as one time-major ``[unrolls · T, envs]`` record."""
    return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), data)


def _latest_return(traj, previous):
    """Return of the most recent episode that ended in `traj` (time-major), else `previous`."""
    done = traj.done.reshape(traj.done.shape[0], -1)
    returns = traj.episode_return.reshape(done.shape)
    any_done = jnp.any(done > 0)
    # Average over the envs' episodes that ended at the last time step where any ended.
    t_last = jnp.max(jnp.where(jnp.any(done > 0, axis=1), jnp.arange(done.shape[0]), -1))
    row_done = done[jnp.maximum(t_last, 0)]
    row_ret = returns[jnp.maximum(t_last, 0)]
    latest = jnp.sum(row_ret * row_done) / jnp.maximum(jnp.sum(row_done), 1.0)
    return jnp.where(any_done, latest, previous)


def _returns_by_age(pop: AgentState, setup: TaskSetup, bins: int, name: str) -> dict[str, Array]:
    """Mean last-episode return of the agents in each age bin (fractions of the reset interval)."""
    frac = jnp.minimum(pop.age / setup.reset_interval, 0.999999)
    idx = jnp.floor(frac * bins).astype(jnp.int32)
    out = {}
    valid = jnp.isfinite(pop.last_return)
    for b in range(bins):
        mask = (idx == b) & valid
        total = jnp.sum(jnp.where(mask, pop.last_return, 0.0))
        count = jnp.sum(mask)
        out[f"return_age{b}/{name}"] = jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)
    out[f"return/{name}"] = jnp.nanmean(jnp.where(valid, pop.last_return, jnp.nan))
    return out


def _zero_fraction(tree) -> Array:
    """Fraction of the elements of a pytree of arrays that are exactly zero."""
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(x == 0) for x in leaves) / sum(x.size for x in leaves)


def _mean_abs(tree) -> Array:
    """Mean of |x| over every element of a pytree of arrays."""
    leaves = jax.tree.leaves(tree)
    return sum(jnp.sum(jnp.abs(x)) for x in leaves) / sum(x.size for x in leaves)
