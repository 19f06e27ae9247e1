"""Action distributions, parameterised by the policy head's output.

``Categorical`` for discrete actions; ``NormalTanh`` for continuous actions in [-1, 1], the
tanh-squashed Gaussian of Brax's PPO (``brax.training.distribution.NormalTanhDistribution``):
the network outputs ``[loc, pre_scale]``, ``scale = softplus(pre_scale) + 0.001``. As in Brax,
samples are kept *before* the tanh ("raw" actions) and log-probabilities include the tanh
Jacobian, because inverting tanh on a saturated action is numerically hopeless.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

Array = jax.Array

_HALF_LOG_2PI = 0.5 * jnp.log(2.0 * jnp.pi)


@dataclass(frozen=True)
class Categorical:
    num_actions: int

    @property
    def param_size(self) -> int:
        return self.num_actions

    def sample(self, key: Array, logits: Array) -> Array:
        return jax.random.categorical(key, logits)

    def mode(self, logits: Array) -> Array:
        return jnp.argmax(logits, axis=-1)

    def postprocess(self, raw_action: Array) -> Array:
        return raw_action

    def log_prob(self, logits: Array, raw_action: Array) -> Array:
        log_pi = jax.nn.log_softmax(logits)
        return jnp.take_along_axis(log_pi, raw_action[..., None].astype(jnp.int32), axis=-1)[..., 0]

    def entropy(self, logits: Array, key: Array | None = None) -> Array:
        log_pi = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.exp(log_pi) * log_pi, axis=-1)


def _tanh_log_det_jacobian(x: Array) -> Array:
    # log(1 - tanh(x)^2), written to stay finite for large |x|.
    return 2.0 * (jnp.log(2.0) - x - jax.nn.softplus(-2.0 * x))


@dataclass(frozen=True)
class NormalTanh:
    action_size: int
    min_std: float = 0.001

    @property
    def param_size(self) -> int:
        return 2 * self.action_size

    def _loc_scale(self, params: Array) -> tuple[Array, Array]:
        loc, pre_scale = jnp.split(params, 2, axis=-1)
        return loc, jax.nn.softplus(pre_scale) + self.min_std

    def sample(self, key: Array, params: Array) -> Array:
        loc, scale = self._loc_scale(params)
        return loc + scale * jax.random.normal(key, loc.shape, loc.dtype)

    def mode(self, params: Array) -> Array:
        return self._loc_scale(params)[0]

    def postprocess(self, raw_action: Array) -> Array:
        return jnp.tanh(raw_action)

    def log_prob(self, params: Array, raw_action: Array) -> Array:
        loc, scale = self._loc_scale(params)
        log_normal = -0.5 * jnp.square((raw_action - loc) / scale) - _HALF_LOG_2PI - jnp.log(scale)
        return jnp.sum(log_normal - _tanh_log_det_jacobian(raw_action), axis=-1)

    def entropy(self, params: Array, key: Array) -> Array:
        # The entropy of a tanh-squashed Gaussian has no closed form; like Brax, add the
        # Jacobian term at one sample to the Gaussian's entropy.
        loc, scale = self._loc_scale(params)
        entropy = 0.5 + _HALF_LOG_2PI + jnp.log(scale)
        sample = loc + scale * jax.random.normal(key, loc.shape, loc.dtype)
        return jnp.sum(entropy + _tanh_log_det_jacobian(sample), axis=-1)


def make_distribution(env) -> Categorical | NormalTanh:
    """The action distribution for ``env``: categorical if discrete, else tanh-Gaussian."""
    if env.discrete:
        return Categorical(env.num_actions)
    return NormalTanh(env.action_size)
