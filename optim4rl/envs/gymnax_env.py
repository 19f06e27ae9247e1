"""gymnax tasks (classic control, MinAtar) behind the optim4rl :class:`Env` interface.

The adapter calls gymnax's ``reset_env`` / ``step_env`` (one episode, no auto-reset) with the
task's default ``EnvParams``; :meth:`Env.step` adds our auto-reset and episode statistics.
gymnax (>= 1.0) reports termination from ``step_env`` and the time limit separately
(``is_truncated``: ``time >= params.max_steps_in_episode``), which map onto our
``terminated`` / ``truncated``. Any ``EnvParams`` field can be overridden by keyword, e.g.
``make("CartPole-v1", max_steps_in_episode=200)``.

Observations are float32. MinAtar's ``(10, 10, channels)`` boolean images are transposed to
channels-first ``(channels, 10, 10)``, the layout of the gridworld observations, so one network
convention serves both. Discrete actions are integers; continuous actions (Pendulum-v1,
MountainCarContinuous-v0) are given in ``[-1, 1]^action_size`` and mapped affinely onto the
task's action box.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.envs.backends import import_backend
from optim4rl.envs.base import Env
from optim4rl.envs.registry import GYMNAX_TASKS  # noqa: F401  (re-export)

@dataclass(frozen=True)
class GymnaxEnv(Env):
    """A gymnax task as an optim4rl environment (see the module docstring).

    Attributes:
      env_id: gymnax id, e.g. "CartPole-v1", "Breakout-MinAtar".
      params_overrides: sorted (field, value) pairs replacing fields of the task's EnvParams.
    """

    env_id: str = "CartPole-v1"
    params_overrides: tuple[tuple[str, Any], ...] = ()
    name: str = ""
    discrete: bool = field(default=True, init=False)
    gymnax_env: Any = field(default=None, init=False, compare=False, repr=False)
    env_params: Any = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        gymnax = import_backend("gymnax")
        spaces = import_backend("gymnax.environments.spaces")

        if self.env_id not in gymnax.registered_envs:
            raise ValueError(
                f"unknown gymnax env {self.env_id!r}; "
                f"known: {', '.join(gymnax.registered_envs)}"
            )
        env, params = gymnax.make(self.env_id)
        overrides = dict(self.params_overrides)
        allowed = [f.name for f in dataclasses.fields(params)]
        for key in overrides:
            if key not in allowed:
                raise ValueError(
                    f"unknown option {key!r} for gymnax env {self.env_id!r}; "
                    f"allowed: {', '.join(allowed)}"
                )
        params = params.replace(**overrides)
        object.__setattr__(self, "params_overrides", tuple(sorted(overrides.items())))
        object.__setattr__(self, "gymnax_env", env)
        object.__setattr__(self, "env_params", params)
        if not self.name:
            object.__setattr__(self, "name", self.env_id)

        action_space = env.action_space(params)
        if isinstance(action_space, spaces.Discrete):
            object.__setattr__(self, "discrete", True)
            object.__setattr__(self, "_num_actions", int(action_space.n))
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            object.__setattr__(self, "discrete", False)
            object.__setattr__(self, "_num_actions", int(action_space.shape[0]))
            low = np.broadcast_to(np.asarray(action_space.low, np.float32), action_space.shape)
            high = np.broadcast_to(np.asarray(action_space.high, np.float32), action_space.shape)
            object.__setattr__(self, "_action_box", (tuple(low.tolist()), tuple(high.tolist())))
        else:
            raise ValueError(f"gymnax env {self.env_id!r} has an unsupported action space")
        raw = jax.eval_shape(lambda k: env.reset_env(k, params)[0], jax.random.key(0))
        object.__setattr__(self, "_image_obs", len(raw.shape) == 3)
        shape = tuple(raw.shape)
        object.__setattr__(self, "_obs_shape", (shape[2], shape[0], shape[1]) if len(shape) == 3 else shape)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return self._obs_shape

    @property
    def num_actions(self) -> int:
        return self._num_actions

    @property
    def action_size(self) -> int:
        return 1 if self.discrete else self._num_actions

    @property
    def max_episode_steps(self) -> int:
        return int(self.env_params.max_steps_in_episode)

    def _obs(self, obs):
        obs = jnp.asarray(obs, jnp.float32)
        return jnp.transpose(obs, (2, 0, 1)) if self._image_obs else obs

    def _action(self, action):
        if self.discrete:
            return jnp.asarray(action, jnp.int32)
        low, high = (jnp.asarray(b, jnp.float32) for b in self._action_box)
        action = jnp.clip(jnp.asarray(action, jnp.float32).reshape(low.shape), -1.0, 1.0)
        return low + 0.5 * (action + 1.0) * (high - low)

    def reset_env(self, key):
        obs, state = self.gymnax_env.reset_env(key, self.env_params)
        return state, self._obs(obs)

    def step_env(self, key, state, action):
        env, params = self.gymnax_env, self.env_params
        obs, state, reward, terminated, _ = env.step_env(key, state, self._action(action), params)
        truncated = env.is_truncated(state, params)
        reward = jnp.reshape(jnp.asarray(reward, jnp.float32), ())
        return state, self._obs(obs), reward, jnp.reshape(terminated, ()), truncated


def make_gymnax(env_id: str, **params_overrides) -> GymnaxEnv:
    """``GymnaxEnv`` for ``env_id``; keywords override fields of its gymnax ``EnvParams``."""
    if "params_overrides" in params_overrides:
        params_overrides.update(dict(params_overrides.pop("params_overrides")))
    return GymnaxEnv(env_id=env_id, params_overrides=tuple(sorted(params_overrides.items())))
