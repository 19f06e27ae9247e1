"""Brax tasks (ant, humanoid, walker2d, ...) behind the optim4rl :class:`Env` interface.

``BraxEnv(task="ant", backend="spring", episode_length=1000, action_repeat=1)`` wraps
``brax.envs.get_environment(task, backend=...)`` the way ``brax.envs.wrappers.training`` does
for Brax's own PPO, so returns are comparable with ``brax.training.agents.ppo``:

- ``action_repeat`` physics-level env steps per agent step, rewards summed, ``done`` taken from
  the last one (Brax's ``EpisodeWrapper``);
- the episode is truncated once ``episode_length`` underlying steps have passed
  (``truncated = 1``, unless the last step also terminated);
- auto-reset returns to the episode's cached first state instead of calling ``reset`` on every
  step (Brax's ``AutoResetWrapper``): a Brax reset initialises the physics pipeline, and under
  ``vmap`` it would run for every environment on every step. As in Brax, each environment instance therefore restarts
  from the same initial state; a fresh ``Env.reset`` draws a new one.

Brax's ``step`` is deterministic, so the key passed to :meth:`Env.step` is not used.
Actions are continuous in ``[-1, 1]^action_size`` (clipped). The wrapped environment is
``env.brax_env`` (unwrapped: no episode or auto-reset wrappers).
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optim4rl.envs.backends import import_backend
from optim4rl.envs.base import Env
from optim4rl.envs.registry import BRAX_TASKS  # noqa: F401  (re-export)

BACKENDS = ("positional", "spring", "generalized", "mjx")
# Default physics pipeline: "spring", the fastest on CPU among the pipelines that run every
# listed task (ant, 128 envs, 2 shared cores, best of interleaved rounds: spring 7.5k steps/s,
# mjx 4.4k, generalized 3.1k, positional 1.5k; it compiled no slower than the others). Its impulse-based
# contacts and spring joints are also the closest to the legacy Brax (v1, "legacy_spring")
# physics the paper's code ran on. Swimmer ships for "generalized" only. "generalized" and "mjx"
# are more accurate; pass ``backend=`` to choose.
DEFAULT_BACKEND = "spring"
_TASK_BACKENDS = {"swimmer": "generalized"}


def default_backend(task: str) -> str:
    return _TASK_BACKENDS.get(task, DEFAULT_BACKEND)


class BraxInner(NamedTuple):
    state: Any  # brax.envs.State of the running episode
    first: Any  # brax.envs.State the episode started from (reused by auto-reset)
    t: jax.Array  # int32 agent steps taken in this episode


def _check_task_kwargs(task: str, cls, kwargs: dict) -> None:
    """Reject options the Brax task's constructor would not accept, with one clear line."""
    PipelineEnv = import_backend("brax.envs.base").PipelineEnv

    allowed = set()
    for klass in (cls, PipelineEnv):
        params = inspect.signature(klass.__init__).parameters
        allowed |= {n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD}
    allowed -= {"self", "sys", "backend"}
    for name in kwargs:
        if name not in allowed:
            raise ValueError(
                f"unknown option {name!r} for brax env {task!r}; "
                f"allowed: backend, episode_length, action_repeat, {', '.join(sorted(allowed))}"
            )


@dataclass(frozen=True)
class BraxEnv(Env):
    """A Brax task as an optim4rl environment (see the module docstring).

    Attributes:
      task: Brax environment name (``brax.envs.get_environment``).
      backend: physics pipeline: "positional", "spring", "generalized" or "mjx"
        (None: :func:`default_backend`).
      episode_length: time limit in underlying Brax steps (Brax's ``EpisodeWrapper``).
      action_repeat: Brax steps per agent step.
      task_kwargs: extra constructor options for the Brax task, as sorted (name, value) pairs.
    """

    task: str = "ant"
    backend: str | None = None  # None: default_backend(task)
    episode_length: int = 1000
    action_repeat: int = 1
    task_kwargs: tuple[tuple[str, Any], ...] = ()
    name: str = ""
    discrete: bool = False
    brax_env: Any = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.backend is None:
            object.__setattr__(self, "backend", default_backend(self.task))
        if self.backend not in BACKENDS:
            raise ValueError(
                f"unknown brax backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}"
            )
        if int(self.episode_length) < 1:
            raise ValueError(f"episode_length must be >= 1, got {self.episode_length}")
        if int(self.action_repeat) < 1:
            raise ValueError(f"action_repeat must be >= 1, got {self.action_repeat}")
        kwargs = dict(self.task_kwargs)
        object.__setattr__(self, "task_kwargs", tuple(sorted(kwargs.items())))
        if not self.name:
            object.__setattr__(self, "name", self.task)
        with warnings.catch_warnings():
            # Brax warns on every model load that it is in maintenance mode; say it once, not
            # on every env construction.
            warnings.filterwarnings("ignore", message="Brax System", category=UserWarning)
            brax_envs = import_backend("brax.envs")

            registry = getattr(brax_envs, "_envs", None)
            if registry is not None and self.task not in registry:
                raise ValueError(
                    f"unknown brax task {self.task!r}; known tasks: {', '.join(sorted(registry))}"
                )
            if registry is not None:
                _check_task_kwargs(self.task, registry[self.task], kwargs)
            env = brax_envs.get_environment(self.task, backend=self.backend, **kwargs)
        object.__setattr__(self, "brax_env", env)
        # Shapes by abstract evaluation: Brax's own `observation_size` runs a real (un-jitted)
        # reset, which takes seconds.
        shapes = jax.eval_shape(env.reset, jax.random.key(0))
        if not hasattr(shapes.obs, "shape"):
            raise ValueError(f"brax env {self.task!r} has dict observations, which are unsupported")
        object.__setattr__(self, "_obs_shape", tuple(shapes.obs.shape))

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return self._obs_shape

    @property
    def num_actions(self) -> int:
        return int(self.brax_env.action_size)

    @property
    def action_size(self) -> int:
        return self.num_actions

    @property
    def max_episode_steps(self) -> int:
        return math.ceil(self.episode_length / self.action_repeat)

    def reset_env(self, key):
        state = self.brax_env.reset(key)
        return BraxInner(state, state, jnp.zeros((), jnp.int32)), state.obs

    def step_env(self, key, inner: BraxInner, action):
        del key  # Brax dynamics are deterministic
        action = jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)
        state = inner.state
        if self.action_repeat == 1:
            state = self.brax_env.step(state, action)
            reward = state.reward
        else:

            def repeat(s, _):
                s = self.brax_env.step(s, action)
                return s, s.reward

            state, rewards = jax.lax.scan(repeat, state, None, self.action_repeat)
            reward = jnp.sum(rewards)
        t = inner.t + 1
        truncated = t * self.action_repeat >= self.episode_length
        return BraxInner(state, inner.first, t), state.obs, reward, state.done, truncated

    def reset_where_done(self, key, is_done, inner: BraxInner, obs):
        del key
        state = jax.tree.map(lambda f, s: jnp.where(is_done, f, s), inner.first, inner.state)
        t = jnp.where(is_done, 0, inner.t)
        obs = jnp.where(is_done, inner.first.obs, obs).astype(jnp.float32)
        return BraxInner(state, inner.first, t), obs


def make_brax(task: str, **kwargs) -> BraxEnv:
    """``BraxEnv`` for ``task``: ``backend``, ``episode_length``, ``action_repeat`` are adapter
    options; any other keyword is passed to the Brax task's constructor."""
    own = {k: kwargs.pop(k) for k in ("backend", "episode_length", "action_repeat") if k in kwargs}
    if "task_kwargs" in kwargs:
        kwargs.update(dict(kwargs.pop("task_kwargs")))
    return BraxEnv(task=task, task_kwargs=tuple(sorted(kwargs.items())), **own)
