"""Recurrent coordinate-wise learned optimizers: Optim4RL and the L2L and Lin baselines.

All three keep one GRU state per scalar parameter (zeros at init) and share their weights ``φ``
across coordinates. They differ in what the GRU reads and in how its output becomes an update
(docs/paper_settings.md §1; Lan et al., "Learning to Optimize for Reinforcement Learning", arXiv 2302.01470).

Each ``step`` hands a coordinate-wise ``_network`` to :func:`~optim4rl.optimizers.base.coordinatewise`,
which runs it in cache-sized blocks on CPU; the networks therefore take columns ``[..., N]`` /
``[..., features, N]`` with possible leading batch axes, and return the update divided by ``−α``
(the step size multiplies it outside, so that the network depends on φ and the columns only).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from optim4rl.optimizers.base import (GRUState, LearnedOptimizer, MetaParams, check_choice,
                                      check_positive, coordinatewise, freeze_sequences)
from optim4rl.optimizers import native
from optim4rl.optimizers.nets import gru_apply, gru_init, mlp_apply, mlp_init

Array = jax.Array


def sign_log_features(grads: Array, eps: float = 1e-18) -> tuple[Array, Array]:
    """Optim4RL's gradient processing ``g -> (sign g, log(|g| + eps))``.

    No information is lost (``g = sign · (exp(log) − eps)``), but gradients spanning many orders of
    magnitude become inputs of order 1..100 that a small network can read (paper §4.2).
    """
    return jnp.sign(grads), jnp.log(jnp.abs(grads) + eps)


def l2l_features(grads: Array, p: float = 10.0, eps: float = 1e-8) -> Array:
    """Andrychowicz et al. (2016) preprocessing, ``[..., N] -> [..., 2, N]``.

    ``(log|g| / p, sign g)`` where ``|g| ≥ e^-p``, else ``(−1, e^p · g)``. As in the reference code,
    the test is ``log(|g| + eps) / p ≥ −1`` (``eps`` keeps the log finite at ``g = 0``).
    """
    scaled_log = jnp.log(jnp.abs(grads) + eps) / p
    large = scaled_log >= -1.0
    first = jnp.where(large, scaled_log, -1.0)
    second = jnp.where(large, jnp.sign(grads), jnp.exp(p) * grads)
    return jnp.stack([first, second], axis=-2)


class Optim4RLState(NamedTuple):
    """State of :class:`Optim4RL`: two recurrent states per coordinate and a step count."""

    hidden_m: Array  # [hidden_size, N] GRU-1, drives the first pseudo-moment m
    hidden_v: Array  # [hidden_size, N] GRU-2, drives the second pseudo-moment v
    count: Array  # int32


@dataclasses.dataclass(frozen=True)
class Optim4RL(LearnedOptimizer):
    """Optim4RL: an RNN optimizer with Adam's inductive bias built in (docs/paper_settings.md §1).

    GRU-1 reads the processed gradient and, through an MLP head, gives ``o1``; GRU-2 reads the
    processed squared gradient and gives ``o2``. Then ``m = sign(g)·exp(o1)``, ``v = exp(o2)`` and
    ``Δθ = −α · m / sqrt(v + eps)``: the network only learns magnitudes on a log scale, and every
    update has the sign of ``−g``.

    Attributes:
      hidden_size: GRU state size (8).
      head_sizes: hidden layers of each MLP head (16, 16), ReLU. ``()`` gives the linear heads of
        the authors' final (RLC 2024) code, the ``rlc2024`` configuration.
      inputs: ``"sign_log"``: GRU-1 reads ``(sign g, log(|g| + log_eps))`` and GRU-2 reads
        ``2·log(|g| + log_eps)``, the log of ``g²`` (the arXiv paper and the authors' 2023 code);
        ``"raw"``: GRU-1 reads ``g`` and GRU-2 reads ``g²`` (the authors' final, RLC 2024 code; the
        "no gradient processing" ablation).
      log_eps: ε inside the log of the gradient processing (1e-18). Gradients far below it all
        look alike to the network; that is the only information the processing drops.
      eps: ε inside the square root (1e-8).
      log_scale: factor on the log features (``sign_log`` only; 1.0 as in the paper). RL
        gradients give ``log|g|`` of about −5 … −40, which saturates the GRU's gates at a
        standard initialisation, so every coordinate gets nearly the same step size. A factor
        such as 0.1 keeps the inputs of order one and loses no information; on its own it did not
        make CPU-scale meta-training use |g| (docs/DESIGN.md).
      sign_flip: the learned sign of the authors' 2023 code (their final code has none; off by
        default, as in the paper). GRU-1's head gives two outputs; the first becomes ``s = sign(tanh(o + sign_bias))``
        in the forward pass, with the gradient of ``tanh`` (straight-through), and
        ``m = s · sign(g) · exp(o1)``. The optimizer may then step *against* the current gradient
        where its history says the sign is noise, a momentum-like move the paper's form cannot
        make.
      sign_bias: added before the ``tanh`` of ``sign_flip`` so that ``s = +1`` at initialisation
        (1.0, as in the reference).
    """

    hidden_size: int = 8
    head_sizes: tuple[int, ...] = (16, 16)
    inputs: str = "sign_log"
    log_eps: float = 1e-18
    eps: float = 1e-8
    log_scale: float = 1.0
    sign_flip: bool = False
    sign_bias: float = 1.0

    name: ClassVar[str] = "optim4rl"

    def __post_init__(self) -> None:
        freeze_sequences(self)
        check_choice("inputs", self.inputs, ("sign_log", "raw"))
        check_positive("hidden_size", self.hidden_size)
        check_positive("log_eps", self.log_eps)
        check_positive("eps", self.eps)
        check_positive("log_scale", self.log_scale)
        if not isinstance(self.sign_flip, bool):
            raise ValueError(f"sign_flip must be true or false, got {self.sign_flip!r}")

    def init_meta(self, key: Array) -> MetaParams:
        keys = jax.random.split(key, 4)
        m_inputs = 2 if self.inputs == "sign_log" else 1
        return {
            "gru_m": gru_init(keys[0], m_inputs, self.hidden_size),
            "head_m": mlp_init(keys[1], self.hidden_size, self.head_sizes,
                               2 if self.sign_flip else 1),
            "gru_v": gru_init(keys[2], 1, self.hidden_size),
            "head_v": mlp_init(keys[3], self.hidden_size, self.head_sizes, 1),
        }

    def init_state(self, num_coordinates: int) -> Optim4RLState:
        zeros = jnp.zeros((self.hidden_size, num_coordinates), jnp.float32)
        return Optim4RLState(hidden_m=zeros, hidden_v=zeros, count=jnp.zeros((), jnp.int32))

    def network_inputs(self, grads: Array) -> tuple[Array, Array]:
        """What GRU-1 and GRU-2 read (feature-major): ``[2 or 1, N]`` and ``[1, N]``."""
        if self.inputs == "raw":
            return grads[..., None, :], jnp.square(grads)[..., None, :]
        sign, log_abs = sign_log_features(grads, self.log_eps)
        log_abs = self.log_scale * log_abs
        # log(g²) = 2·log|g|: the processed squared gradient, without squaring tiny gradients.
        return jnp.stack([sign, log_abs], axis=-2), (2.0 * log_abs)[..., None, :]

    def step(self, phi, grads, state, params, learning_rate, leaf_sizes):
        direction, hidden_m, hidden_v = coordinatewise(
            self._network, phi, (grads, state.hidden_m, state.hidden_v), native.kernel_for(self))
        return -learning_rate * direction, Optim4RLState(hidden_m, hidden_v, state.count + 1)

    def _network(self, phi, columns):
        grads, hidden_m, hidden_v = columns
        inputs_m, inputs_v = self.network_inputs(grads)
        hidden_m = gru_apply(phi["gru_m"], hidden_m, inputs_m)
        hidden_v = gru_apply(phi["gru_v"], hidden_v, inputs_v)
        out_m = mlp_apply(phi["head_m"], hidden_m)
        o2 = mlp_apply(phi["head_v"], hidden_v)[..., 0, :]
        if self.sign_flip:
            soft = jnp.tanh(out_m[..., 0, :] + self.sign_bias)
            hard = jnp.where(soft >= 0.0, 1.0, -1.0)
            m = (soft + jax.lax.stop_gradient(hard - soft)) * jnp.sign(grads) * jnp.exp(
                out_m[..., 1, :])
        else:
            m = jnp.sign(grads) * jnp.exp(out_m[..., 0, :])
        v = jnp.exp(o2)
        return m * jax.lax.rsqrt(v + self.eps), hidden_m, hidden_v


class _SingleGRU(LearnedOptimizer):
    """Shared state and step of the one-GRU baselines: ``Δθ = −α · direction`` where
    ``(direction, hidden') = self._network(φ, (g, hidden))`` runs coordinate-wise; subclasses
    are frozen dataclasses with a ``hidden_size`` field."""

    def init_state(self, num_coordinates: int) -> GRUState:
        return GRUState(hidden=jnp.zeros((self.hidden_size, num_coordinates), jnp.float32),
                        count=jnp.zeros((), jnp.int32))

    def step(self, phi, grads, state, params, learning_rate, leaf_sizes):
        direction, hidden = coordinatewise(self._network, phi, (grads, state.hidden),
                                           native.kernel_for(self))
        return -learning_rate * direction, GRUState(hidden, state.count + 1)


@dataclasses.dataclass(frozen=True)
class L2L(_SingleGRU):
    """L2L baseline after Andrychowicz et al. (2016), "Learning to learn by gradient descent by
    gradient descent": one GRU on the log/sign preprocessing (:func:`l2l_features`), an MLP head to
    a scalar ``o``, update ``Δθ = −α · exp(o) · g`` (reference ``L2LGD2``).

    Attributes:
      hidden_size: GRU state size (8).
      head_sizes: hidden layers of the MLP head (16, 16).
      p: preprocessing constant (10).
      eps: ε inside the preprocessing log (1e-8, as in the reference).
    """

    hidden_size: int = 8
    head_sizes: tuple[int, ...] = (16, 16)
    p: float = 10.0
    eps: float = 1e-8

    name: ClassVar[str] = "l2l"

    def __post_init__(self) -> None:
        freeze_sequences(self)
        check_positive("hidden_size", self.hidden_size)
        check_positive("p", self.p)
        check_positive("eps", self.eps)

    def init_meta(self, key: Array) -> MetaParams:
        key_gru, key_head = jax.random.split(key)
        return {
            "gru": gru_init(key_gru, 2, self.hidden_size),
            "head": mlp_init(key_head, self.hidden_size, self.head_sizes, 1),
        }

    def _network(self, phi, columns):
        grads, hidden = columns
        hidden = gru_apply(phi["gru"], hidden, l2l_features(grads, self.p, self.eps))
        o = mlp_apply(phi["head"], hidden)[..., 0, :]
        return jnp.exp(o) * grads, hidden


@dataclasses.dataclass(frozen=True)
class Lin(_SingleGRU):
    """Lin baseline: one GRU on the raw gradient, an MLP head to ``(o1, o2, o3)``, update
    ``Δθ = −α · (exp(o1) · g + exp(o2) · o3)``: a learned gradient scale plus a learned free term
    (reference ``LinearOptim``).

    Attributes:
      hidden_size: GRU state size (8).
      head_sizes: hidden layers of the MLP head (16, 16).
    """

    hidden_size: int = 8
    head_sizes: tuple[int, ...] = (16, 16)

    name: ClassVar[str] = "lin"

    def __post_init__(self) -> None:
        freeze_sequences(self)
        check_positive("hidden_size", self.hidden_size)

    def init_meta(self, key: Array) -> MetaParams:
        key_gru, key_head = jax.random.split(key)
        return {
            "gru": gru_init(key_gru, 1, self.hidden_size),
            "head": mlp_init(key_head, self.hidden_size, self.head_sizes, 3),
        }

    def _network(self, phi, columns):
        grads, hidden = columns
        hidden = gru_apply(phi["gru"], hidden, grads[..., None, :])
        out = mlp_apply(phi["head"], hidden)
        return jnp.exp(out[..., 0, :]) * grads + jnp.exp(out[..., 1, :]) * out[..., 2, :], hidden
