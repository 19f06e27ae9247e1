"""The small networks inside learned optimizers, as pure functions on explicit parameter dicts.

A learned optimizer runs one tiny network per scalar coordinate of the agent, with shared weights.
Writing the GRU and MLP as plain functions of ``(params, batch)`` makes that a single batched matrix
product over all coordinates (``x: [N, features]``), keeps the meta-parameters an ordinary nested
dict of float32 arrays (easy to save, differentiate and meta-optimise), and avoids module
bookkeeping on the hot path.

Initialisation and gate equations follow ``flax.linen.GRUCell`` / ``flax.linen.Dense``
(LeCun-normal input kernels, orthogonal recurrent kernels, zero biases), the networks the reference
implementation of Optim4RL (sail-sg/optim4rl) was built with.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict

_lecun_normal = jax.nn.initializers.lecun_normal()
_orthogonal = jax.nn.initializers.orthogonal()


def dense_init(key: Array, in_size: int, out_size: int) -> Params:
    """One affine layer: LeCun-normal kernel ``w: [in, out]``, zero bias ``b: [out]``."""
    return {
        "w": _lecun_normal(key, (in_size, out_size), jnp.float32),
        "b": jnp.zeros((out_size,), jnp.float32),
    }


def mlp_init(key: Array, in_size: int, hidden_sizes: Sequence[int], out_size: int) -> Params:
    """An MLP ``in -> hidden_sizes... -> out`` as ``{"dense0": ..., "dense1": ..., ...}``."""
    sizes = [in_size, *hidden_sizes, out_size]
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"dense{i}": dense_init(keys[i], sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)}


def mlp_apply(params: Params, x: Array) -> Array:
    """ReLU between layers, linear output. ``x: [..., in] -> [..., out]``."""
    num_layers = len(params)
    for i in range(num_layers):
        layer = params[f"dense{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < num_layers - 1:
            x = jax.nn.relu(x)
    return x


def gru_init(key: Array, in_size: int, hidden_size: int) -> Params:
    """GRU cell parameters, gates stacked in the order (reset r, update z, candidate n).

    ``wi: [in, 3H]`` input kernels, ``wh: [H, 3H]`` recurrent kernels, ``b: [3H]`` the biases of
    r, z and of the candidate's input side, ``bhn: [H]`` the bias of the candidate's recurrent side
    (it sits inside ``r * (...)``, so it cannot be merged into ``b``).
    """
    key_in, key_h = jax.random.split(key)
    keys_in = jax.random.split(key_in, 3)
    keys_h = jax.random.split(key_h, 3)
    wi = jnp.concatenate([_lecun_normal(k, (in_size, hidden_size), jnp.float32) for k in keys_in], 1)
    wh = jnp.concatenate([_orthogonal(k, (hidden_size, hidden_size), jnp.float32) for k in keys_h], 1)
    return {
        "wi": wi,
        "wh": wh,
        "b": jnp.zeros((3 * hidden_size,), jnp.float32),
        "bhn": jnp.zeros((hidden_size,), jnp.float32),
    }


def gru_apply(params: Params, h: Array, x: Array) -> Array:
    """One GRU step, ``h: [..., H]``, ``x: [..., in] -> new h: [..., H]`` (flax GRUCell equations).

    ``r = σ(x Wir + h Whr + br)``, ``z = σ(x Wiz + h Whz + bz)``,
    ``n = tanh(x Win + bin + r ⊙ (h Whn + bhn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``.
    """
    hidden = h.shape[-1]
    from_x = x @ params["wi"] + params["b"]
    from_h = h @ params["wh"]
    reset = jax.nn.sigmoid(from_x[..., :hidden] + from_h[..., :hidden])
    update = jax.nn.sigmoid(from_x[..., hidden:2 * hidden] + from_h[..., hidden:2 * hidden])
    candidate = jnp.tanh(from_x[..., 2 * hidden:] + reset * (from_h[..., 2 * hidden:] + params["bhn"]))
    return (1.0 - update) * candidate + update * h
