"""The identity experiment (Lan et al. 2023, Sec. 4.2): can a tiny RNN even represent agent-gradients?

A learned optimizer must at least be able to output something proportional to its input gradient.
Agent-gradients span many orders of magnitude, and a small recurrent network fed raw `g` cannot
reproduce them: to be within 10% of a gradient of size 1e-6 its output must be accurate to 1e-7,
while the same weights must also reproduce gradients of size 1. Fed the processed pair
`[sign g, log(|g| + eps)]` and emitting `sign(g) · exp(o)` — the parametrisation Optim4RL uses for its
pseudo-moments — the network only has to learn `o ≈ log|g|`, a map that is the same at every scale.

Both variants are coordinate-wise (every gradient coordinate is a batch element; the recurrence runs
over that coordinate's consecutive snapshots), share the architecture (GRU + ReLU MLP head), the
loss and the optimizer (Adam), and are scored on held-out coordinates by the fraction of outputs
within ±10% of the target, `|pred − g| ≤ 0.1 · |g|`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["IdentityRNN", "identity_experiment", "within_tolerance"]


class IdentityRNN(nn.Module):
    """GRU + MLP head applied coordinate-wise to one gradient snapshot.

    `inputs="raw"`: reads g, outputs the head's value. `inputs="processed"`: reads
    `[sign g, log(|g| + eps)]` (a lossless encoding) and outputs `sign(g) · exp(o)`.
    """

    inputs: str = "processed"
    hidden_size: int = 8
    mlp_dims: Sequence[int] = (16, 16)
    eps: float = 1e-18

    @nn.compact
    def __call__(self, hidden: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        g = jax.lax.stop_gradient(g)
        if self.inputs == "processed":
            features = jnp.stack([jnp.sign(g), jnp.log(jnp.abs(g) + self.eps)], axis=-1)
        else:
            features = g[..., None]
        hidden, x = nn.GRUCell(features=self.hidden_size)(hidden, features)
        for width in self.mlp_dims:
            x = nn.relu(nn.Dense(width)(x))
        out = nn.Dense(1)(x)[..., 0]
        if self.inputs == "processed":
            out = jnp.sign(g) * jnp.exp(out)
        return hidden, out


def within_tolerance(pred: Any, target: Any, tolerance: float = 0.1) -> Any:
    """Elementwise `|pred − target| ≤ tolerance · |target|` (the paper's "±10%" accuracy)."""
    return jnp.abs(pred - target) <= tolerance * jnp.abs(target)


def _windows(series: np.ndarray, seq_len: int) -> np.ndarray:
    """`[coord, T]` -> non-overlapping `[window, seq_len]` pieces (a short tail is dropped)."""
    n_windows = series.shape[1] // seq_len
    pieces = series[:, : n_windows * seq_len].reshape(series.shape[0], n_windows, seq_len)
    return pieces.reshape(-1, seq_len)


def _loss_fn(kind: str, eps: float):
    if kind == "mse":  # the authors' choice; dominated by the largest gradients
        return lambda pred, target: jnp.square(pred - target)
    if kind == "relative":  # scale-free, matching the ±10% criterion; log1p bounds outliers
        return lambda pred, target: jnp.log1p(jnp.square((pred - target) / (jnp.abs(target) + eps)))
    raise ValueError(f"unknown identity loss {kind!r}; use 'relative' or 'mse'")


def _train_and_score(
    model: IdentityRNN,
    train: jax.Array,
    test: jax.Array,
    key: jax.Array,
    steps: int,
    batch_size: int,
    learning_rate: float,
    loss_kind: str,
    tolerance: float,
) -> dict[str, Any]:
    def unroll(params, windows):  # windows: [batch, seq_len], time along axis 1
        hidden0 = jnp.zeros((windows.shape[0], model.hidden_size), windows.dtype)
        _, preds = jax.lax.scan(lambda h, g: model.apply(params, h, g), hidden0, windows.T)
        return preds.T

    pointwise = _loss_fn(loss_kind, 1e-12)

    def loss(params, windows):
        preds = unroll(params, windows)
        accuracy = jnp.mean(within_tolerance(preds, windows, tolerance))
        return jnp.mean(pointwise(preds, windows)), accuracy

    init_key, train_key = jax.random.split(key)
    params = model.init(
        init_key, jnp.zeros((1, model.hidden_size), jnp.float32), jnp.zeros((1,), jnp.float32)
    )
    tx = optax.adam(learning_rate)

    def step(carry, step_key):
        params, opt_state = carry
        batch = train[jax.random.randint(step_key, (batch_size,), 0, train.shape[0])]
        (value, accuracy), grads = jax.value_and_grad(loss, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (value, accuracy)

    @jax.jit
    def run(params, key):
        carry, (losses, accuracies) = jax.lax.scan(
            step, (params, tx.init(params)), jax.random.split(key, steps)
        )
        return carry[0], losses, accuracies

    params, losses, accuracies = run(params, train_key)
    test_accuracy = jax.jit(lambda p, w: jnp.mean(within_tolerance(unroll(p, w), w, tolerance)))
    return {
        "accuracy": float(test_accuracy(params, test)),
        "train_loss": np.asarray(losses),
        "train_accuracy": np.asarray(accuracies),
    }


def identity_experiment(
    grads: Any,
    steps: int = 1000,
    seed: int = 0,
    *,
    seq_len: int = 5,
    batch_size: int = 256,
    hidden_size: int = 8,
    mlp_dims: Sequence[int] = (16, 16),
    learning_rate: float = 3e-3,
    loss: str = "relative",
    test_fraction: float = 0.2,
    tolerance: float = 0.1,
    max_test_windows: int = 20_000,
) -> dict[str, Any]:
    """Train a raw-input and a processed-input RNN to output their input gradient; score both.

    `grads` is `grads[snapshot, coord]` as recorded (a 1-D array is one snapshot). Each coordinate's
    series is cut into windows of `seq_len` consecutive snapshots (the authors used 5), the hidden
    state starting at zero in every window. A random `test_fraction` of the coordinates is held
    out; the scores are the fractions of held-out outputs within `±tolerance` of their target.
    `loss="relative"` (default) trains both networks on a scale-free error that matches the score;
    `loss="mse"` is the authors' plain squared error. Default sizes run in seconds on a CPU.

    Returns `{"raw": accuracy, "processed": accuracy, "raw_train_accuracy": [steps],
    "processed_train_accuracy": [steps], "raw_train_loss": [steps], "processed_train_loss": [steps],
    "n_train_windows", "n_test_windows", "seq_len", "steps"}`.
    """
    values = np.asarray(grads, dtype=np.float32)
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise ValueError(f"grads must be [snapshot, coord], got shape {values.shape}")
    values = values[:, np.all(np.isfinite(values), axis=0)]
    n_snapshots, n_coords = values.shape
    seq_len = max(1, min(seq_len, n_snapshots))
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n_coords < 2 or n_snapshots == 0:
        raise ValueError("identity_experiment needs at least 2 coordinates with finite gradients")
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_coords)
    n_test = min(n_coords - 1, max(1, round(test_fraction * n_coords)))
    series = values.T  # [coord, snapshot]
    train = _windows(series[order[n_test:]], seq_len)
    test = _windows(series[order[:n_test]], seq_len)
    if test.shape[0] > max_test_windows:
        test = test[rng.choice(test.shape[0], max_test_windows, replace=False)]

    result: dict[str, Any] = {}
    key = jax.random.PRNGKey(seed)
    for inputs in ("raw", "processed"):
        model = IdentityRNN(inputs=inputs, hidden_size=hidden_size, mlp_dims=tuple(mlp_dims))
        # The same key for both variants: identical batches, comparable initialisations.
        scores = _train_and_score(
            model, jnp.asarray(train), jnp.asarray(test), key, steps, batch_size, learning_rate,
            loss, tolerance,
        )
        result[inputs] = scores["accuracy"]
        result[f"{inputs}_train_accuracy"] = scores["train_accuracy"]
        result[f"{inputs}_train_loss"] = scores["train_loss"]
    result.update(
        n_train_windows=int(train.shape[0]), n_test_windows=int(test.shape[0]), seq_len=seq_len,
        steps=steps,
    )
    return result
