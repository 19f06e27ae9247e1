"""Step-size response of an optimizer: what ``|Δθ| / α`` it gives a coordinate, by gradient size.

A quick look inside any optimizer, learned or hand-designed. Each coordinate receives, for
``steps`` updates, a gradient of fixed magnitude ``|g|`` whose sign flips at random with
probability ``flip_prob`` (0: a consistent gradient; 0.5: pure noise). The final update, divided by
the step size α, is reported per magnitude and noise level.

Adam's answer is the reference: about 1 for consistent gradients of any size (it is scale-free)
and much less than 1 for noise, because its first moment averages the signs away. An optimizer
that answers the same number everywhere is sign descent with a fixed step, whatever its
architecture; that is what a learned optimizer whose GRU saturates on ``log|g|`` does.
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


def format_response(result: dict) -> str:
    """A Markdown table: one row per noise level, one column per gradient magnitude."""
    header = "| sign-flip prob. \\ gradient size | " + " | ".join(f"{m:g}" for m in result["magnitudes"]) + " |"
    rule = "|---|" + "---|" * len(result["magnitudes"])
    rows = [f"| {p:g} | " + " | ".join(f"{v:.3g}" for v in values) + " |"
            for p, values in zip(result["flip_probs"], result["response"])]
    return "\n".join([f"`{result['spec']}`: |Δθ|/α after {result['steps']} updates", "",
                      header, rule, *rows])
