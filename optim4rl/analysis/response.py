"""Step-size response of an optimizer: what ``|Δθ| / α`` it gives a coordinate, by gradient size.

A quick look inside any optimizer, learned or hand-designed. Each coordinate receives, for
``steps`` updates, a gradient of fixed magnitude ``|g|`` whose sign flips at random with
probability ``flip_prob`` (0: a consistent gradient; 0.5: pure noise). The final update, divided by
the step size α, is reported per magnitude and noise level.

Adam's answer is the reference: about 1 for consistent gradients of any size (it is scale-free)
and much less than 1 for noise, because its first moment averages the signs away. An optimizer
that answers the same number everywhere is sign descent with a fixed step, whatever its
architecture; that is what a learned optimizer whose GRU saturates on ``log|g|`` does.

:func:`relative_response` asks the other question an adaptive optimizer answers: after a history
of gradients of one size, how does the step follow a last gradient that is ``r`` times that size?
RMSProp's step grows with ``r`` (``g/sqrt(v)``), Adam's a little (its momentum holds the history),
sign descent's not at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.errors import ConfigError
from optim4rl.optimizers import make_optimizer

DEFAULT_MAGNITUDES = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_FLIP_PROBS = (0.0, 0.25, 0.5)


def step_response(spec: str, magnitudes: Sequence[float] = DEFAULT_MAGNITUDES,
                  flip_probs: Sequence[float] = DEFAULT_FLIP_PROBS, steps: int = 20,
                  coordinates: int = 256, grad_clip: float | None = None, seed: int = 0) -> dict:
    """``|Δθ|/α`` after ``steps`` updates, averaged over ``coordinates`` coordinates per cell.

    Returns ``{"spec", "magnitudes", "flip_probs", "steps", "response": [[...]]}`` with
    ``response[i][j]`` for ``flip_probs[i]`` and ``magnitudes[j]``.
    """
    if steps < 1 or coordinates < 1:
        raise ConfigError("step_response needs steps >= 1 and coordinates >= 1")
    if any(not 0.0 <= p <= 1.0 for p in flip_probs):
        raise ConfigError(f"flip probabilities must lie in [0, 1], got {list(flip_probs)}")
    if any(m <= 0 for m in magnitudes):
        raise ConfigError(f"gradient magnitudes must be positive, got {list(magnitudes)}")
    tx = make_optimizer(spec, 1.0, grad_clip=grad_clip)
    mags = jnp.asarray(magnitudes, jnp.float32)
    probs = jnp.asarray(flip_probs, jnp.float32)
    # One coordinate block per (noise level, magnitude) cell, all updated together.
    shape = (len(flip_probs), len(magnitudes), coordinates)
    params = {"w": jnp.zeros(shape, jnp.float32)}

    def run(key):
        def body(carry, key):
            state, sign = carry
            flip = jax.random.bernoulli(key, probs[:, None, None], shape)
            sign = jnp.where(flip, -sign, sign)
            updates, state = tx.update({"w": sign * mags[None, :, None]}, state, params)
            return (state, sign), updates["w"]

        carry = (tx.init(params), jnp.ones(shape, jnp.float32))
        _, updates = jax.lax.scan(body, carry, jax.random.split(key, steps))
        return jnp.mean(jnp.abs(updates[-1]), axis=-1)

    response = np.asarray(jax.jit(run)(jax.random.key(seed)), np.float64)
    return {"spec": spec, "magnitudes": [float(m) for m in magnitudes],
            "flip_probs": [float(p) for p in flip_probs], "steps": int(steps),
            "response": response.tolist()}


DEFAULT_RATIOS = (0.01, 0.1, 1.0, 10.0, 100.0)


def relative_response(spec: str, ratios: Sequence[float] = DEFAULT_RATIOS,
                      magnitudes: Sequence[float] = (1e-4, 1e-2), steps: int = 20, coordinates: int = 256,
                      grad_clip: float | None = None, seed: int = 0) -> dict:
    """``|Δθ|/α`` of a last gradient ``r·|g|`` after ``steps − 1`` gradients of size ``|g|``.

    The history has random signs (a noisy coordinate, as in RL); the last gradient's sign is random
    too. Returns ``{"spec", "magnitudes", "ratios", "steps", "response": [[...]]}`` with
    ``response[i][j]`` for ``magnitudes[i]`` and ``ratios[j]``.
    """
    if steps < 2 or coordinates < 1:
        raise ConfigError("relative_response needs steps >= 2 and coordinates >= 1")
    if any(r <= 0 for r in ratios) or any(m <= 0 for m in magnitudes):
        raise ConfigError(f"ratios and gradient magnitudes must be positive, got {list(ratios)}, "
                          f"{list(magnitudes)}")
    tx = make_optimizer(spec, 1.0, grad_clip=grad_clip)
    shape = (len(magnitudes), len(ratios), coordinates)
    size = jnp.broadcast_to(jnp.asarray(magnitudes, jnp.float32)[:, None, None], shape)
    last = size * jnp.asarray(ratios, jnp.float32)[None, :, None]
    params = {"w": jnp.zeros(shape, jnp.float32)}

    def run(key):
        signs = jnp.where(jax.random.bernoulli(key, 0.5, (steps,) + shape), 1.0, -1.0)
        sizes = jnp.concatenate([jnp.broadcast_to(size, (steps - 1,) + shape), last[None]])

        def body(state, grad):
            updates, state = tx.update({"w": grad}, state, params)
            return state, updates["w"]

        _, updates = jax.lax.scan(body, tx.init(params), signs * sizes)
        return jnp.mean(jnp.abs(updates[-1]), axis=-1)

    response = np.asarray(jax.jit(run)(jax.random.key(seed)), np.float64)
    return {"spec": spec, "magnitudes": [float(m) for m in magnitudes], "ratios": [float(r) for r in ratios],
            "steps": int(steps), "response": response.tolist()}


def format_relative(result: dict) -> str:
    """A Markdown table: one row per history gradient size, one column per last/history ratio."""
    header = "| history size \\ last gradient / history | " + " | ".join(
        f"{r:g}×" for r in result["ratios"]) + " |"
    rule = "|---|" + "---|" * len(result["ratios"])
    rows = [f"| {m:g} | " + " | ".join(f"{v:.3g}" for v in values) + " |"
            for m, values in zip(result["magnitudes"], result["response"])]
    return "\n".join([f"`{result['spec']}`: |Δθ|/α of the last of {result['steps']} noisy gradients, "
                      "by its size relative to the others", "", header, rule, *rows])


def format_response(result: dict) -> str:
    """A Markdown table: one row per noise level, one column per gradient magnitude."""
    header = "| sign-flip prob. \\ gradient size | " + " | ".join(f"{m:g}" for m in result["magnitudes"]) + " |"
    rule = "|---|" + "---|" * len(result["magnitudes"])
    rows = [f"| {p:g} | " + " | ".join(f"{v:.3g}" for v in values) + " |"
            for p, values in zip(result["flip_probs"], result["response"])]
    return "\n".join([f"`{result['spec']}`: |Δθ|/α after {result['steps']} updates", "",
                      header, rule, *rows])
