"""STAR baseline (Harrison, Metz, Sohl-Dickstein, "A Closer Look at Learned Optimization:
Stability, Robustness, and Inductive Biases", NeurIPS 2022).

A per-coordinate MLP (two hidden layers of 4, ReLU) reads momentum, second-moment and
adafactor-style features of the gradient together with the parameter value and a step-count
embedding. Its learned step ``direction · exp(exp_mult · magnitude) · α`` is added to a nominal
Adam-like step (the mean over the momentum decays of ``m / sqrt(rms + 1e-6)``, scaled by
``nominal_stepsize · exp(exp_mult)``), which keeps the optimizer stable while the MLP is untrained.

This mirrors ``MLPNomLOpt`` as configured by the Optim4RL reference code (learned_optimization's
``adafac_nominal``; ``step_mult`` = learning rate, ``nominal_stepsize`` = 1e-3, AdamAggMo nominal
direction, no nominal/regularisation controller, no weight decay), including its meta-learned
accumulator decays and the per-tensor second-moment normalisation of the features.

One deliberate difference: learned_optimization factors the adafactor accumulators of ≥ 2-D
tensors into row and column statistics. Here every coordinate keeps its own (diagonal)
accumulators, which is what the reference does for 0-D and 1-D tensors; it keeps the optimizer
strictly coordinate-wise, so all leaves are processed as one flat batch.

On a CPU the update runs as a fused kernel (``native.star_forward``: two passes over each
tensor, the first for the features' statistics); its meta-gradient is the VJP of the same update
as JAX (:meth:`STAR.update_rule`), the forward pass recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.optimizers.base import (LearnedOptimizer, MetaParams, check_positive,
                                      freeze_sequences)
from optim4rl.optimizers import native
from optim4rl.optimizers.nets import dense_apply

Array = jax.Array

# Time scales of the tanh step-count embedding (learned_optimization's ``tanh_embedding``).
STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


class STARState(NamedTuple):
    """State of :class:`STAR`: per-coordinate accumulators and the step count."""

    momentum: Array  # [len(momentum_decays), N] EMAs of g
    rms: Array  # [len(rms_decays), N] EMAs of g²
    adafactor: Array  # [len(adafactor_decays), N] EMAs of g² + 1e-30 (diagonal adafactor)
    count: Array  # int32 number of updates done so far


def step_embedding(count: Array) -> Array:
    """``tanh(t / s − 1)`` for the time scales ``s`` of :data:`STEP_TIMESCALES`, shape ``[11]``."""
    timescales = jnp.asarray(STEP_TIMESCALES, jnp.float32)
    return jnp.tanh(jnp.asarray(count, jnp.float32) / timescales - 1.0)


def learned_decay(initial: tuple[float, ...], shift: Array) -> Array:
    """Decay parametrised as in learned_optimization: ``1 − (1 − β0) · exp(10 · shift)``."""
    return 1.0 - (1.0 - jnp.asarray(initial, jnp.float32)) * jnp.exp(10.0 * shift)


@dataclasses.dataclass(frozen=True)
class STAR(LearnedOptimizer):
    """STAR: MLP learned optimizer with a nominal Adam-like term (see the module docstring).

    Attributes:
      hidden_size: width of the hidden layers (4).
      hidden_layers: number of hidden layers (2).
      momentum_decays: initial decays of the momentum accumulators (0.9, 0.99, 0.999).
      rms_decays: initial decay of the second-moment accumulator (0.999,).
      adafactor_decays: initial decays of the adafactor-style accumulators (0.9, 0.99, 0.999).
      exp_mult: scale of the magnitude output inside the exponential (0.001).
      nominal_stepsize: step size of the nominal Adam-like term (1e-3, as in the reference; it does
        not follow the learning rate, which scales only the learned step).
    """

    hidden_size: int = 4
    hidden_layers: int = 2
    momentum_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    rms_decays: tuple[float, ...] = (0.999,)
    adafactor_decays: tuple[float, ...] = (0.9, 0.99, 0.999)
    exp_mult: float = 0.001
    nominal_stepsize: float = 1e-3

    name: ClassVar[str] = "star"
    uses_params: ClassVar[bool] = True

    def __post_init__(self) -> None:
        freeze_sequences(self)
        check_positive("hidden_size", self.hidden_size)
        if not isinstance(self.hidden_layers, int) or self.hidden_layers < 0:
            raise ValueError("hidden_layers must be a non-negative integer, "
                             f"got {self.hidden_layers!r}")
        if len(self.momentum_decays) < 1:
            raise ValueError("momentum_decays must not be empty")
        if len(self.rms_decays) not in (1, len(self.momentum_decays)):
            raise ValueError("rms_decays must have one entry or as many as momentum_decays")
        if len(self.adafactor_decays) != len(self.momentum_decays):
            raise ValueError("adafactor_decays must have as many entries as momentum_decays")

    @property
    def num_features(self) -> int:
        """Per-coordinate inputs before the step embedding (28 with the default decays)."""
        n_m, n_r, n_f = len(self.momentum_decays), len(self.rms_decays), len(self.adafactor_decays)
        return 2 + 2 * n_m + 2 * n_r + 5 * n_f + n_m

    def init_meta(self, key: Array) -> MetaParams:
        in_size = self.num_features + len(STEP_TIMESCALES)
        sizes = [in_size] + [self.hidden_size] * self.hidden_layers + [2]
        keys = jax.random.split(key, len(sizes) - 1)
        mlp = {}
        for i in range(len(sizes) - 1):
            # Haiku's TruncatedNormal(1/sqrt(fan_in)): truncated at ±2 std, no variance correction.
            stddev = 1.0 / np.sqrt(sizes[i])
            w = stddev * jax.random.truncated_normal(keys[i], -2.0, 2.0, (sizes[i], sizes[i + 1]),
                                                     jnp.float32)
            mlp[f"dense{i}"] = {"w": w, "b": jnp.zeros((sizes[i + 1],), jnp.float32)}
        return {
            "momentum_decay_shift": jnp.zeros((len(self.momentum_decays),), jnp.float32),
            "rms_decay_shift": jnp.zeros((len(self.rms_decays),), jnp.float32),
            "adafactor_decay_shift": jnp.zeros((len(self.adafactor_decays),), jnp.float32),
            "mlp": mlp,
        }

    def init_state(self, num_coordinates: int) -> STARState:
        def zeros(decays):
            return jnp.zeros((len(decays), num_coordinates), jnp.float32)

        return STARState(momentum=zeros(self.momentum_decays), rms=zeros(self.rms_decays),
                         adafactor=zeros(self.adafactor_decays), count=jnp.zeros((), jnp.int32))

    def features(self, grads: Array, params: Array, momentum: Array, rms: Array,
                 adafactor: Array) -> Array:
        """The per-coordinate inputs before normalisation, ``[num_features, n]``.

        The feature list (duplicates included) is learned_optimization's non-factored case.
        """
        g = grads[None]
        rsqrt_rms = jax.lax.rsqrt(rms + 1e-6)
        rsqrt_adafactor = jax.lax.rsqrt(adafactor + 1e-8)
        return jnp.concatenate([
            g, params[None], momentum, rms, momentum * rsqrt_rms, rsqrt_rms,
            g * jax.lax.rsqrt(jnp.maximum(adafactor + 1e-9, 1e-9)),
            adafactor, adafactor, rsqrt_adafactor, rsqrt_adafactor,
            momentum * (adafactor + 1e-6) ** -0.5,
        ], axis=0)

    def step(self, phi, grads, state, params, learning_rate, leaf_sizes):
        decay_m = learned_decay(self.momentum_decays, phi["momentum_decay_shift"])
        # As in learned_optimization, only the second-moment decays are clipped to [0, 1].
        decay_r = jnp.clip(learned_decay(self.rms_decays, phi["rms_decay_shift"]), 0.0, 1.0)
        decay_f = jnp.clip(learned_decay(self.adafactor_decays, phi["adafactor_decay_shift"]),
                           0.0, 1.0)
        # The step embedding is the same for every coordinate: fold it into the first bias
        # instead of broadcasting an [11, N] block.
        mlp = phi["mlp"]
        first = mlp["dense0"]
        embedding_bias = step_embedding(state.count) @ first["w"][self.num_features:] + first["b"]
        layers = [{"w": first["w"][:self.num_features], "b": embedding_bias}]
        layers += [mlp[f"dense{i}"] for i in range(1, len(mlp))]
        lr = jnp.asarray(learning_rate, jnp.float32)
        accumulators = (state.momentum, state.rms, state.adafactor)
        if native.star_supported(self):  # the fused CPU kernel, forward; its VJP as JAX
            coef = _pack(decay_m, decay_r, decay_f, layers, lr)
            delta, *accumulators = _star_kernel(self, tuple(leaf_sizes), coef, grads, params,
                                                *accumulators)
        else:
            delta, *accumulators = self.update_rule((decay_m, decay_r, decay_f), layers, lr, grads,
                                                    params, *accumulators, leaf_sizes=leaf_sizes)
        return delta, STARState(*accumulators, state.count + 1)

    def update_rule(self, decays, layers, learning_rate, grads, params, momentum, rms, adafactor,
                    leaf_sizes):
        """``(delta, momentum', rms', adafactor')`` from the decays and the MLP's layers (the first
        one's bias with the step embedding folded in), as JAX."""
        g = grads[None]
        g_square = jnp.square(g)
        decay_m, decay_r, decay_f = (d[:, None] for d in decays)
        momentum = decay_m * momentum + (1.0 - decay_m) * g
        rms = decay_r * rms + (1.0 - decay_r) * g_square
        adafactor = decay_f * adafactor + (1.0 - decay_f) * (g_square + 1e-30)

        # Each feature is divided by its root mean square over the coordinates of each tensor
        # (the tensors are the contiguous runs of leaf_sizes coordinates; static slices, as an
        # index array of N leaf ids would be a constant as large as the agent). The division is
        # folded into a per-tensor copy of the first layer's weights, so the [num_features, n]
        # features of a tensor are written once and read twice (statistics, first layer) instead
        # of being rescaled and concatenated into a second [num_features, N] array.
        feature_weights, embedding_bias = layers[0]["w"], layers[0]["b"]
        hidden, start = [], 0
        for size in leaf_sizes:
            if size == 0:  # an empty tensor: no features, and its mean (nan) must not reach φ
                continue
            part = slice(start, start + size)
            features = self.features(grads[part], params[part], momentum[:, part], rms[:, part],
                                     adafactor[:, part])
            scale = jax.lax.rsqrt(1e-5 + jnp.mean(jnp.square(features), axis=1))
            hidden.append(dense_apply({"w": scale[:, None] * feature_weights, "b": embedding_bias},
                                      features))
            start += size
        if len(hidden) != 1:  # (no coordinates at all: an empty [hidden, 0] block)
            hidden = hidden or [jnp.zeros((embedding_bias.shape[-1], 0), jnp.float32)]
            x = jnp.concatenate(hidden, axis=1)
        else:
            x = hidden[0]
        for layer in layers[1:]:
            x = dense_apply(layer, jax.nn.relu(x))
        direction, magnitude = x[0], x[1]

        learned_step = direction * jnp.exp(self.exp_mult * magnitude) * learning_rate
        adam = momentum * jax.lax.rsqrt(rms + 1e-6)
        nominal_step = self.nominal * jnp.mean(adam, axis=0)
        return -(learned_step + nominal_step), momentum, rms, adafactor

    @property
    def nominal(self) -> float:
        """The nominal Adam-like step's factor, ``nominal_stepsize · exp(exp_mult)``."""
        return float(self.nominal_stepsize * np.exp(self.exp_mult))


# The kernel's coefficient row (native.star_forward, optim4rl_cpu.cc): the decays, the layers
# (first: feature weights [28, 4] and the bias with the step embedding; then [4, 4] and [4, 2])
# and the learning rate, flat.
def _pack(decay_m, decay_r, decay_f, layers, learning_rate):
    leaves = [decay_m, decay_r, decay_f]
    for layer in layers:
        leaves += [layer["w"], layer["b"]]
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves + [learning_rate]])


def _unpack(opt: STAR, coef):
    n_m, n_r, n_f = len(opt.momentum_decays), len(opt.rms_decays), len(opt.adafactor_decays)
    sizes = [opt.num_features] + [opt.hidden_size] * opt.hidden_layers + [2]
    shapes = [(n_m,), (n_r,), (n_f,)]
    for i in range(len(sizes) - 1):
        shapes += [(sizes[i], sizes[i + 1]), (sizes[i + 1],)]
    pieces, offset = [], 0
    for shape in shapes + [()]:
        size = int(np.prod(shape))
        pieces.append(coef[offset:offset + size].reshape(shape))
        offset += size
    decays, rest, learning_rate = pieces[:3], pieces[3:-1], pieces[-1]
    layers = [{"w": w, "b": b} for w, b in zip(rest[::2], rest[1::2])]
    return tuple(decays), layers, learning_rate


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _star_kernel(opt, leaf_sizes, coef, grads, params, momentum, rms, adafactor):
    return native.star_forward(coef, grads, params, momentum, rms, adafactor, leaf_sizes,
                               opt.exp_mult, opt.nominal)


def _star_kernel_fwd(opt, leaf_sizes, *operands):
    return _star_kernel(opt, leaf_sizes, *operands), operands


def _star_kernel_bwd(opt, leaf_sizes, operands, cotangents):
    # The meta-gradient: the VJP of the same update as JAX (the forward pass recomputed).
    def rule(coef, *columns):
        decays, layers, learning_rate = _unpack(opt, coef)
        return opt.update_rule(decays, layers, learning_rate, *columns, leaf_sizes=leaf_sizes)

    _, vjp = jax.vjp(rule, *operands)
    return vjp(tuple(cotangents))


_star_kernel.defvjp(_star_kernel_fwd, _star_kernel_bwd)
