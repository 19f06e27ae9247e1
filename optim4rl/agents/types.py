"""Pieces shared by A2C and PPO: the trajectory record, episode statistics, and the
``make_train`` object both algorithms return (PureJaxRL shape, see docs/DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optim4rl.errors import ConfigError

Array = jax.Array
Metrics = dict[str, Array]


class Trajectory(NamedTuple):
    """A rollout, time-major: every field has leading axes ``[T, num_envs]``.

    ``obs[t]`` is the observation the agent acted on at step t; ``reward[t]``, ``done[t]``,
    ``truncated[t]`` come from that step (see :class:`optim4rl.envs.TimeStep`); ``episode_return[t]``
    is the undiscounted return of the episode that ended at step t (meaningful where ``done``).
    """

    obs: Array
    action: Array
    reward: Array
    done: Array
    truncated: Array
    episode_return: Array


def mean_episode_return(done: Array, episode_return: Array, previous: Array) -> Array:
    """Mean return of the episodes that ended in ``done`` (any shape); ``previous`` if none did.

    This is the ``episode_return`` metric of docs/DESIGN.md: it carries the last value forward
    and stays NaN until the first episode ends.
    """
    num_done = jnp.sum(done)
    mean = jnp.sum(episode_return * done) / jnp.maximum(num_done, 1.0)
    return jnp.where(num_done > 0, mean, previous).astype(jnp.float32)


def plan_updates(total_steps: int, steps_per_update: int, updates_per_chunk: int) -> tuple[int, int, int]:
    """Returns (num_updates, updates_per_chunk, num_chunks).

    The run is a whole number of chunks, so ``num_updates`` is ``total_steps / steps_per_update``
    rounded up to a multiple of the chunk size: a run may use up to one chunk more environment
    steps than asked for, never fewer.
    """
    if total_steps <= 0:
        raise ConfigError(f"total_steps must be positive, got {total_steps}")
    if updates_per_chunk <= 0:
        raise ConfigError(f"updates_per_chunk must be positive, got {updates_per_chunk}")
    wanted = max(1, math.ceil(total_steps / steps_per_update))
    updates_per_chunk = min(updates_per_chunk, wanted)
    num_chunks = math.ceil(wanted / updates_per_chunk)
    return num_chunks * updates_per_chunk, updates_per_chunk, num_chunks


class Trainer:
    """What ``make_train`` returns: a pure, jit-able training run for ONE seed.

    ``train(key)`` runs the whole training in one ``lax.scan`` (over chunks), ``train.init(key)``
    builds the state, ``train.run_chunk(state)`` advances it by ``updates_per_chunk`` updates.
    ``train(key)``'s metrics equal the concatenation of the chunks' metrics, because it is the
    same ``run_chunk`` scanned ``num_chunks`` times. Nothing here is jitted: the caller jits and
    vmaps (``jax.jit(jax.vmap(train.run_chunk))``).

    Subclasses define ``init(key)`` and ``run_chunk(state)``.
    """

    num_updates: int
    updates_per_chunk: int
    num_chunks: int
    steps_per_update: int

    def init(self, key: Array) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_chunk(self, state: Any) -> tuple[Any, Metrics]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def total_steps(self) -> int:
        """Environment steps the whole run takes (per seed)."""
        return self.num_updates * self.steps_per_update

    def __call__(self, key: Array) -> tuple[Any, Metrics]:
        state = self.init(key)
        state, metrics = jax.lax.scan(lambda s, _: self.run_chunk(s), state, None, length=self.num_chunks)
        metrics = jax.tree.map(lambda x: x.reshape((self.num_updates,) + x.shape[2:]), metrics)
        return state, metrics

