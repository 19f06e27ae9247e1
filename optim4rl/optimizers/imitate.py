"""Fit a learned optimizer's step sizes to another optimizer's (``optim4rl imitate``).

Not part of the paper. Pipeline meta-training from a random φ gives, at CPU scale, fixed-step
sign descent (docs/DESIGN.md). This asks the opposite question: can the architecture *represent*
Adam's step-size rule, noise damping included? The learned optimizer and a target (any optax
optimizer, or another learned one) read the same synthetic per-coordinate gradient streams, and φ
is fitted by Adam to the squared error of ``log(|Δθ|/α + floor)`` on the steps with a non-zero
gradient (Optim4RL's update is zero where the gradient is). Only magnitudes are matched: Optim4RL
and L2L always step against the current gradient, so their sign is not theirs to learn.

The streams, one per coordinate, are built to cover what an RL agent's gradients do
(docs/gradients.md): a scale 10^U(−8, 0) that drifts slowly over time, a signal-to-noise ratio
from pure signal to 20× noise (mean in U(−1, 1), noise 10^U(−2, 1.3)), a probability 0, 0.5 or
0.9 of an exactly zero gradient at each step (inactive ReLU units), and the elementwise clip to
[−1, 1] that meta-training uses.

The result is a φ like any other: ``optim4rl:FILE.o4r`` trains agents, and ``meta-train --set
init_from=FILE.o4r`` starts pipeline meta-training from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim4rl.errors import ConfigError
from optim4rl.optimizers.base import LearnedOptimizer, MetaParams

Array = jax.Array

ZERO_PROBABILITIES = (0.0, 0.0, 0.5, 0.9)


@dataclasses.dataclass(frozen=True)
class ImitationConfig:
    """Settings of :func:`imitate` (all recorded in the output file's provenance)."""

    target: str = "adam"  # an optax name (learning rate 1) or a learned spec such as optim4rl:FILE
    steps: int = 500  # Adam steps on φ, each on a fresh batch of streams
    coordinates: int = 2048  # streams per batch
    horizon: int = 200  # updates per stream (backpropagation through time over all of them)
    learning_rate: float = 3e-3  # Adam on φ, cosine-decayed to 0 over `steps`
    floor: float = 1e-4  # added to |Δθ|/α before the log: steps below it count as "tiny"
    chunk: int = 25  # steps per jitted scan between progress reports
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "coordinates", "horizon", "chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"imitation {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("learning_rate", "floor"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"imitation {name} must be positive, got {getattr(self, name)!r}")


def gradient_streams(key: Array, coordinates: int, horizon: int) -> Array:
    """``[horizon, coordinates]`` synthetic gradients, one stream per coordinate (module docstring)."""
    ks = jax.random.split(key, 7)
    log_scale = jax.random.uniform(ks[0], (coordinates,), minval=-8.0, maxval=0.0)
    drift = 0.02 * jnp.cumsum(jax.random.normal(ks[1], (horizon, coordinates)), axis=0)
    mean = jax.random.uniform(ks[2], (coordinates,), minval=-1.0, maxval=1.0)
    noise = 10.0 ** jax.random.uniform(ks[3], (coordinates,), minval=-2.0, maxval=1.3)
    xi = jax.random.normal(ks[4], (horizon, coordinates))
    p_zero = jnp.asarray(ZERO_PROBABILITIES)[
        jax.random.randint(ks[5], (coordinates,), 0, len(ZERO_PROBABILITIES))]
    active = jax.random.uniform(ks[6], (horizon, coordinates)) >= p_zero
    g = 10.0 ** (log_scale + drift) * (mean + noise * xi) / jnp.sqrt(mean**2 + noise**2)
    return jnp.clip(jnp.where(active, g, 0.0), -1.0, 1.0)


def magnitudes(tx: optax.GradientTransformation, grads: Array) -> Array:
    """``|Δθ|`` of ``tx`` (built with learning rate 1) along streams ``grads [T, N]``."""
    params = jnp.zeros(grads.shape[1:], jnp.float32)

    def body(state, g):
        update, state = tx.update(g, state, params)
        return state, jnp.abs(update)

    _, out = jax.lax.scan(body, tx.init(params), grads)
    return out


def imitation_loss(opt: LearnedOptimizer, phi: MetaParams, grads: Array, target: Array,
                   floor: float) -> Array:
    """Mean squared log-magnitude error over the steps with a non-zero gradient."""
    got = magnitudes(opt.transform(phi, 1.0), grads)
    err = jnp.log(got + floor) - jnp.log(target + floor)
    mask = (grads != 0).astype(jnp.float32)
    return jnp.sum(mask * err**2) / jnp.maximum(jnp.sum(mask), 1.0)


def target_transform(opt: LearnedOptimizer, cfg: ImitationConfig) -> optax.GradientTransformation:
    """The target optimizer at learning rate 1; a clear error if ``opt`` or the target cannot be used."""
    from optim4rl.optimizers.make import make_optimizer

    if opt.uses_params:
        raise ConfigError(f"imitate: '{opt.name}' reads the parameter values, which synthetic "
                          "gradient streams do not have; use optim4rl, l2l or lin")
    return make_optimizer(cfg.target, learning_rate=1.0)


def imitate(opt: LearnedOptimizer, phi: MetaParams, cfg: ImitationConfig,
            callback: Callable[[dict[str, Any]], None] | None = None) -> tuple[MetaParams, dict[str, Any]]:
    """Fits ``phi`` so that ``opt``'s step sizes match ``cfg.target``'s; returns ``(phi, report)``.

    ``report`` has the held-out loss (a fixed batch never trained on) before and after, and the
    training loss per chunk. The whole fit runs in jitted ``lax.scan`` chunks of ``cfg.chunk`` steps.
    """
    target_tx = target_transform(opt, cfg)
    schedule = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    fit_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))

    def batch_loss(phi, key):
        grads = gradient_streams(key, cfg.coordinates, cfg.horizon)
        return imitation_loss(opt, phi, grads, magnitudes(target_tx, grads), cfg.floor)

    def fit_step(carry, key):
        phi, fit_state = carry
        loss, grad = jax.value_and_grad(batch_loss)(phi, key)
        updates, fit_state = fit_tx.update(grad, fit_state, phi)
        return (optax.apply_updates(phi, updates), fit_state), loss

    @jax.jit
    def run_chunk(carry, keys):
        return jax.lax.scan(fit_step, carry, keys)

    key = jax.random.key(cfg.seed)
    heldout_key, train_key = jax.random.split(key)
    heldout = jax.jit(batch_loss)
    before = float(heldout(phi, heldout_key))
    carry, losses, done = (phi, fit_tx.init(phi)), [], 0
    while done < cfg.steps:
        length = min(cfg.chunk, cfg.steps - done)
        keys = jax.vmap(lambda i: jax.random.fold_in(train_key, i))(jnp.arange(done, done + length))
        carry, chunk_losses = run_chunk(carry, keys)
        chunk_losses = np.asarray(chunk_losses)
        if not np.isfinite(chunk_losses).all():
            raise ConfigError(f"imitate: non-finite loss at step {done + 1}; lower "
                              "--set learning_rate=...")
        losses.append(float(chunk_losses.mean()))
        done += length
        if callback is not None:
            callback({"done": done, "total": cfg.steps, "loss": losses[-1]})
    phi = carry[0]
    report = {"heldout_loss_before": before, "heldout_loss_after": float(heldout(phi, heldout_key)),
              "train_loss_by_chunk": losses}
    return phi, report
