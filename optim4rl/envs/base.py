"""One functional interface for every environment optim4rl trains on.

An environment is an immutable object with pure methods, so that it can be closed over by
``jit``-ed code and ``vmap``-ed over many instances (PureJaxRL / gymnax style)::

    state, obs = env.reset(key)
    state, ts = env.step(key, state, action)   # ts: TimeStep, auto-reset on done

Subclasses implement :meth:`Env.reset_env` and :meth:`Env.step_env` (one episode, no
auto-reset). :meth:`Env.step` adds the automatic reset and the episode statistics that the
trainers log (undiscounted return and length of the episode that just ended).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class TimeStep(NamedTuple):
    """What one call of :meth:`Env.step` returns besides the new state.

    ``obs`` is the observation the agent acts on next: after a terminal step it is already the
    first observation of the next episode. ``done`` is 1.0 when the episode ended at this step
    (termination or time limit), ``truncated`` is 1.0 when it ended only because of the time limit.
    ``episode_return`` / ``episode_length`` hold the statistics of the episode that just ended and
    are meaningful only where ``done`` is 1.
    """

    obs: Array
    reward: Array
    done: Array
    truncated: Array
    episode_return: Array
    episode_length: Array


class EnvState(NamedTuple):
    """Wraps an environment's own state with running episode statistics."""

    inner: Any
    episode_return: Array
    episode_length: Array


class Env:
    """Base class. Subclasses are frozen dataclasses (hashable, usable as static jit args).

    Attributes every environment provides:
      name: registry name.
      observation_shape: shape of one observation (float32).
      discrete: True for a discrete action space.
      num_actions: number of discrete actions (discrete envs).
      action_size: dimension of the continuous action in [-1, 1] (continuous envs).
      max_episode_steps: time limit.
    """

    name: str = "env"
    discrete: bool = True

    @property
    def observation_shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def num_actions(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def action_size(self) -> int:
        return 1 if self.discrete else self.num_actions

    @property
    def max_episode_steps(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- to implement -------------------------------------------------------------------
    def reset_env(self, key: Array) -> tuple[Any, Array]:  # pragma: no cover - abstract
        """Start an episode: returns (inner_state, obs)."""
        raise NotImplementedError

    def step_env(self, key: Array, inner: Any, action: Array):  # pragma: no cover - abstract
        """One step without auto-reset: returns (inner, obs, reward, terminated, truncated)."""
        raise NotImplementedError

    # --- provided -----------------------------------------------------------------------
    def reset(self, key: Array) -> tuple[EnvState, Array]:
        inner, obs = self.reset_env(key)
        zero = jnp.zeros((), jnp.float32)
        return EnvState(inner, zero, jnp.zeros((), jnp.int32)), obs.astype(jnp.float32)

    def step(self, key: Array, state: EnvState, action: Array) -> tuple[EnvState, TimeStep]:
        step_key, reset_key = jax.random.split(key)
        inner, obs, reward, terminated, truncated = self.step_env(step_key, state.inner, action)
        reward = jnp.asarray(reward, jnp.float32)
        terminated = jnp.asarray(terminated, jnp.float32)
        truncated = jnp.asarray(truncated, jnp.float32) * (1.0 - terminated)
        done = jnp.maximum(terminated, truncated)
        ep_return = state.episode_return + reward
        ep_length = state.episode_length + 1
        is_done = done > 0
        inner, obs = self.reset_where_done(reset_key, is_done, inner, obs)
        new_state = EnvState(
            inner,
            jnp.where(is_done, 0.0, ep_return),
            jnp.where(is_done, 0, ep_length),
        )
        return new_state, TimeStep(obs, reward, done, truncated, ep_return, ep_length)

    def reset_where_done(
        self, key: Array, is_done: Array, inner: Any, obs: Array
    ) -> tuple[Any, Array]:
        """Auto-reset: the state and observation to continue from after a step.

        The default samples a fresh episode with :meth:`reset_env` and selects it where
        ``is_done`` (both branches are computed, as ``vmap`` would do anyway). Environments whose
        reset is expensive (Brax) override this, e.g. to reuse a cached first state.
        """
        reset_inner, reset_obs = self.reset_env(key)
        inner = jax.tree.map(lambda r, s: jnp.where(is_done, r, s), reset_inner, inner)
        obs = jnp.where(is_done, reset_obs, obs).astype(jnp.float32)
        return inner, obs
