"""Running mean and standard deviation of observations, for PPO's observation normalisation.

Welford's algorithm over batches, as in Brax (``brax.training.acme.running_statistics``): the
statistics start at mean 0, std 1, are updated from each rollout before the gradient steps,
and the std is clipped to [1e-6, 1e6].
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array

STD_MIN = 1e-6
STD_MAX = 1e6


@flax.struct.dataclass
class RunningStatistics:
    count: Array  # int32: observations seen
    mean: Array
    summed_variance: Array
    std: Array


def init(observation_shape: tuple[int, ...]) -> RunningStatistics:
    zeros = jnp.zeros(observation_shape, jnp.float32)
    return RunningStatistics(jnp.zeros((), jnp.int32), zeros, zeros, jnp.ones(observation_shape, jnp.float32))


def update(stats: RunningStatistics, batch: Array) -> RunningStatistics:
    """Adds ``batch`` (any leading batch axes, then the observation shape) to the statistics."""
    batch_ndim = batch.ndim - stats.mean.ndim
    axes = tuple(range(batch_ndim))
    count = stats.count + math.prod(batch.shape[:batch_ndim])
    count_f = count.astype(jnp.float32)
    diff_to_old_mean = batch - stats.mean
    mean = stats.mean + jnp.sum(diff_to_old_mean, axis=axes) / count_f
    summed_variance = stats.summed_variance + jnp.sum(diff_to_old_mean * (batch - mean), axis=axes)
    # Rounding can make the summed variance slightly negative.
    std = jnp.clip(jnp.sqrt(jnp.maximum(summed_variance, 0.0) / count_f), STD_MIN, STD_MAX)
    return RunningStatistics(count, mean, summed_variance, std)


def normalize(obs: Array, stats: RunningStatistics) -> Array:
    return (obs - stats.mean) / stats.std
