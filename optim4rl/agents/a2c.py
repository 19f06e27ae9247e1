"""Advantage actor-critic (A2C) as used in the Optim4RL paper (docs/paper_settings.md §4).

Each update collects a ``rollout_length``-step rollout (20) from ``num_envs`` environments
(512 on gridworlds, 64 on Catch) and takes one optimizer step on

    loss = actor + value_coef · critic − entropy_coef · entropy,
    critic = mean (G^λ_t − V(s_t))²,   actor = −mean log π(a_t|s_t) · sg(G^λ_t − V(s_t)),

where G^λ are TD(λ) returns (λ = 0.95, γ = 0.995) bootstrapped from the value of the observation
after the rollout. The means run over time and environments, so the gradient is the average of
the per-environment gradients. Rewards are multiplied by ``reward_scale`` inside the loss only
(the logged returns stay unscaled). An episode end (termination or time limit) cuts the return,
as in the paper's code.

Meta-training reuses :func:`rollout`, :func:`a2c_loss` and :func:`a2c_grad` unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from optim4rl.agents.distributions import Categorical
from optim4rl.agents.networks import init_params, make_network
from optim4rl.agents.types import Metrics, Trainer, Trajectory, mean_episode_return, plan_updates
from optim4rl.config import check_numbers
from optim4rl.errors import ConfigError

Array = jax.Array

__all__ = [
    "A2CConfig",
    "A2CState",
    "A2CTrain",
    "Trajectory",
    "a2c_grad",
    "a2c_loss",
    "make_train",
    "rollout",
    "td_lambda_returns",
]


def _is_gridworld(env_name: str) -> bool:
    return env_name.startswith(("small_", "big_"))


@dataclass(frozen=True)
class A2CConfig:
    """A2C hyper-parameters. Hashable: ``env_kwargs`` is a tuple of (name, value) pairs.

    Defaults are the paper's Catch settings; :meth:`paper` and :meth:`cpu` give per-task presets.
    ``updates_per_chunk`` is how many updates one ``run_chunk`` call makes (host work such as
    logging happens between chunks).
    """

    env: str = "catch"
    env_kwargs: tuple = ()
    num_envs: int = 64
    rollout_length: int = 20
    gamma: float = 0.995
    gae_lambda: float = 0.95
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    reward_scale: float = 1.0
    total_steps: int = 500_000
    updates_per_chunk: int = 50
    # Big gridworlds' conv layer: "map" convolves over the map's rows x columns (this project's
    # reading of "Conv 16 (2x2)"); "authors" does what the authors' code does, feeding the
    # (planes, rows, columns) observation to a channels-last conv, so it convolves over
    # (plane, row) with the columns as channels (fewer parameters: 39,482 on big_dense_long).
    conv_layout: str = "map"

    def __post_init__(self):
        if isinstance(self.env_kwargs, dict):
            object.__setattr__(self, "env_kwargs", tuple(sorted(self.env_kwargs.items())))
        if isinstance(self.total_steps, float) and self.total_steps.is_integer():
            object.__setattr__(self, "total_steps", int(self.total_steps))
        try:
            check_numbers(self)
        except ValueError as exc:
            raise ConfigError(f"A2CConfig.{exc}") from None
        for name in ("num_envs", "rollout_length", "total_steps", "updates_per_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"A2CConfig.{name} must be a positive integer, got {value!r}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"A2CConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}")
        for name in ("value_coef", "entropy_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(f"A2CConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.reward_scale == 0:
            raise ConfigError("A2CConfig.reward_scale must not be 0")
        if self.conv_layout not in ("map", "authors"):
            raise ConfigError(f"A2CConfig.conv_layout must be 'map' or 'authors', got {self.conv_layout!r}")

    @classmethod
    def paper(cls, env: str = "catch", **overrides) -> "A2CConfig":
        """The paper's budget: Catch 64 envs / 5e5 steps; gridworlds 512 envs / 3e7 steps."""
        if _is_gridworld(env):
            base = dict(num_envs=512, total_steps=30_000_000, updates_per_chunk=100)
        else:
            base = dict(num_envs=64, total_steps=500_000, updates_per_chunk=50)
        return cls(env=env, **{**base, **overrides})

    @classmethod
    def cpu(cls, env: str = "catch", **overrides) -> "A2CConfig":
        """Same structure, budgets sized for a few CPU minutes."""
        if _is_gridworld(env):
            base = dict(num_envs=64, total_steps=2_000_000, updates_per_chunk=100)
        else:
            base = dict(num_envs=64, total_steps=200_000, updates_per_chunk=50)
        return cls(env=env, **{**base, **overrides})

    def replace(self, **changes) -> "A2CConfig":
        return dataclasses.replace(self, **changes)


# --- the algorithm's pieces (module level, reused by meta-training) ---------------------------


def rollout(key: Array, network, params, env, env_state, obs: Array, length: int):
    """Runs the policy for ``length`` steps in a batch of environments.

    ``env_state``/``obs`` are batched over environments (``jax.vmap(env.reset)``). Returns
    ``(env_state, obs, traj)`` where ``obs`` is the observation after the last step (the
    bootstrap observation) and ``traj`` is a time-major :class:`Trajectory` ``[length, num_envs]``.
    No gradient flows into ``params`` through the rollout.
    """
    params = jax.lax.stop_gradient(params)
    num_envs = obs.shape[0]
    dist = Categorical(env.num_actions)

    def step(carry, step_key):
        env_state, obs = carry
        action_key, env_key = jax.random.split(step_key)
        logits = network.apply(params, obs, method="policy")
        action = dist.sample(action_key, logits)
        env_state, ts = jax.vmap(env.step)(jax.random.split(env_key, num_envs), env_state, action)
        record = Trajectory(obs, action, ts.reward, ts.done, ts.truncated, ts.episode_return)
        return (env_state, ts.obs), record

    (env_state, obs), traj = jax.lax.scan(step, (env_state, obs), jax.random.split(key, length))
    return env_state, obs, traj


def td_lambda_returns(rewards: Array, discounts: Array, next_values: Array, lambda_: float) -> Array:
    """TD(λ) returns, time-major ``[T, ...]`` (rlax.lambda_returns):

        G_t = r_t + γ_t ((1 − λ) V(s_{t+1}) + λ G_{t+1}),   G_T-1 bootstraps from V(s_T).

    ``discounts[t]`` is γ·(1 − done_t); ``next_values[t]`` is V(s_{t+1}).
    """

    def backward(acc, xs):
        reward, discount, next_value = xs
        acc = reward + discount * ((1.0 - lambda_) * next_value + lambda_ * acc)
        return acc, acc

    _, returns = jax.lax.scan(backward, next_values[-1], (rewards, discounts, next_values), reverse=True)
    return returns


def a2c_loss(params, network, traj: Trajectory, last_obs: Array, cfg) -> tuple[Array, dict]:
    """The A2C loss of docs/paper_settings.md §4 on one rollout; returns ``(loss, aux)``.

    ``cfg`` needs ``gamma``, ``gae_lambda``, ``value_coef``, ``entropy_coef``, ``reward_scale``
    (an :class:`A2CConfig`, or anything with those attributes, e.g. a per-task override).
    """
    all_obs = jnp.concatenate([traj.obs, last_obs[None]], axis=0)
    logits, values = network.apply(params, all_obs)
    rewards = traj.reward * cfg.reward_scale
    discounts = cfg.gamma * (1.0 - traj.done)
    returns = td_lambda_returns(rewards, discounts, jax.lax.stop_gradient(values[1:]), cfg.gae_lambda)
    td_error = returns - values[:-1]
    value_loss = jnp.mean(jnp.square(td_error))
    dist = Categorical(logits.shape[-1])
    log_prob = dist.log_prob(logits[:-1], traj.action)
    actor_loss = -jnp.mean(log_prob * jax.lax.stop_gradient(td_error))
    entropy = jnp.mean(dist.entropy(logits[:-1]))
    loss = actor_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    return loss, {"actor_loss": actor_loss, "value_loss": value_loss, "entropy": entropy}


def a2c_grad(params, network, traj: Trajectory, last_obs: Array, cfg):
    """Gradient of :func:`a2c_loss` w.r.t. ``params``: returns ``(grads, (loss, aux))``."""
    (loss, aux), grads = jax.value_and_grad(a2c_loss, has_aux=True)(params, network, traj, last_obs, cfg)
    return grads, (loss, aux)


# --- the training loop --------------------------------------------------------------------------


@flax.struct.dataclass
class A2CState:
    """Everything one seed's run carries between updates."""

    params: Any
    opt_state: Any
    env_state: Any
    obs: Array
    key: Array
    update_step: Array  # int32, updates done so far
    last_return: Array  # float32, last logged episode return (NaN before the first episode)


class A2CTrain(Trainer):
    """``make_train``'s result for A2C; see :class:`optim4rl.agents.types.Trainer`."""

    def __init__(self, cfg: A2CConfig, tx: optax.GradientTransformation, env=None, network=None):
        if env is None:
            from optim4rl import envs

            env = envs.make(cfg.env, **dict(cfg.env_kwargs))
        if not env.discrete:
            raise ConfigError(f"A2C needs a discrete action space; {env.name!r} is continuous (use PPO)")
        self.cfg, self.tx, self.env = cfg, tx, env
        self.network = network if network is not None else make_network(env, cfg.conv_layout)
        self.steps_per_update = cfg.num_envs * cfg.rollout_length
        self.num_updates, self.updates_per_chunk, self.num_chunks = plan_updates(
            cfg.total_steps, self.steps_per_update, cfg.updates_per_chunk
        )

    def init(self, key: Array) -> A2CState:
        key, net_key, env_key = jax.random.split(key, 3)
        params = init_params(self.network, net_key, self.env.observation_shape)
        env_state, obs = jax.vmap(self.env.reset)(jax.random.split(env_key, self.cfg.num_envs))
        return A2CState(
            params=params,
            opt_state=self.tx.init(params),
            env_state=env_state,
            obs=obs,
            key=key,
            update_step=jnp.zeros((), jnp.int32),
            last_return=jnp.full((), jnp.nan, jnp.float32),
        )

    def update_with_grads(self, state: A2CState) -> tuple[A2CState, Metrics, Any]:
        """One A2C update; also returns the raw (env-averaged) gradient, for gradient analysis."""
        key, rollout_key = jax.random.split(state.key)
        env_state, obs, traj = rollout(
            rollout_key, self.network, state.params, self.env, state.env_state, state.obs, self.cfg.rollout_length
        )
        grads, (loss, aux) = a2c_grad(state.params, self.network, traj, obs, self.cfg)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        update_step = state.update_step + 1
        last_return = mean_episode_return(traj.done, traj.episode_return, state.last_return)
        metrics = {
            "env_steps": (update_step * self.steps_per_update).astype(jnp.float32),
            "episode_return": last_return,
            "loss": loss,
            "actor_loss": aux["actor_loss"],
            "value_loss": aux["value_loss"],
            "entropy": aux["entropy"],
            "grad_norm": optax.global_norm(grads),
        }
        new_state = A2CState(params, opt_state, env_state, obs, key, update_step, last_return)
        return new_state, metrics, grads

    def update(self, state: A2CState) -> tuple[A2CState, Metrics]:
        state, metrics, _ = self.update_with_grads(state)
        return state, metrics

    def run_chunk(self, state: A2CState) -> tuple[A2CState, Metrics]:
        return jax.lax.scan(lambda s, _: self.update(s), state, None, length=self.updates_per_chunk)


def make_train(cfg: A2CConfig, tx: optax.GradientTransformation, env=None, network=None) -> A2CTrain:
    """A2C training run for ``cfg`` with optimizer ``tx`` (any optax transformation).

    ``env``/``network`` default to ``optim4rl.envs.make(cfg.env, **cfg.env_kwargs)`` and
    :func:`optim4rl.agents.networks.make_network`.
    """
    return A2CTrain(cfg, tx, env=env, network=network)
