"""The small networks inside learned optimizers, as pure functions on explicit parameter dicts.

A learned optimizer runs one tiny network per scalar coordinate of the agent, with shared weights.
Writing the GRU and MLP as plain functions of ``(params, batch)`` makes that a single batched
computation over all coordinates, keeps the meta-parameters an ordinary nested dict of float32
arrays (easy to save, differentiate and meta-optimise), and avoids module bookkeeping on the hot
path.

Activations are *feature-major*, ``x: [features, N]``: the long coordinate axis is the minor
(contiguous) one, so every elementwise op and every gate slice runs over long contiguous rows.
With only 1-24 features per coordinate this is several times faster on CPU than ``[N, features]``
(and it is the coalesced layout on GPU). Weights keep the usual ``w: [in, out]`` shape.

Every function also accepts leading batch axes, ``x: [..., features, N]``, and parameters with
the same leading axes (``w: [..., in, out]``): a block of a vmapped population arrives as
``[agents, features, width]``, and its backward pass differentiates per-agent copies of the
weights (see :func:`optim4rl.optimizers.base.coordinatewise`). Weights are broadcast over the
batch axes and each layer is one batched matmul, so no activation is ever transposed: moving the
agent axis next to the coordinate axis instead costs a transpose per layer, and XLA's CPU
kernels for transposed operands are several times slower than the matmuls themselves.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

Array = jax.Array
Params = dict


def lecun_normal(key: Array, shape: tuple[int, int]) -> Array:
    """flax's default kernel init: truncated normal (±2σ) with variance 1 / fan_in."""
    # 0.8796 is the standard deviation of a unit normal truncated to [-2, 2].
    stddev = (1.0 / shape[0]) ** 0.5 / 0.87962566103423978
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def orthogonal(key: Array, batch: int, size: int) -> Array:
    """``batch`` Haar-random orthogonal ``[size, size]`` matrices (flax's recurrent kernel init).

    The orthogonal polar factor of a Gaussian matrix is Haar-distributed, like the QR-based
    initializer's output. It is computed with Newton-Schulz iterations (a short loop of tiny
    matmuls), which compiles far faster than a LAPACK QR for these 8 x 8 matrices; 60 iterations
    reach float32 orthogonality even for singular values down to ~1e-8 of the largest.
    """
    gaussian = jax.random.normal(key, (batch, size, size), jnp.float32)
    x = gaussian / jnp.linalg.norm(gaussian, axis=(1, 2), keepdims=True)

    def newton_schulz(_, x):
        return 1.5 * x - 0.5 * x @ jnp.swapaxes(x, 1, 2) @ x

    return jax.lax.fori_loop(0, 60, newton_schulz, x)


def dense_init(key: Array, in_size: int, out_size: int) -> Params:
    """One affine layer: LeCun-normal kernel ``w: [in, out]``, zero bias ``b: [out]``."""
    return {"w": lecun_normal(key, (in_size, out_size)), "b": jnp.zeros((out_size,), jnp.float32)}


def mlp_init(key: Array, in_size: int, hidden_sizes: Sequence[int], out_size: int) -> Params:
    """An MLP ``in -> hidden_sizes... -> out`` as ``{"dense0": ..., "dense1": ..., ...}``."""
    sizes = [in_size, *hidden_sizes, out_size]
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"dense{i}": dense_init(keys[i], sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)}


def dense_apply(layer: Params, x: Array) -> Array:
    """Affine map on feature-major activations: ``x: [..., in, N] -> [..., out, N]``.

    Inside :func:`fused_rows`, a layer with one output (a head's last layer) is a sum of scaled
    rows (:func:`rowwise_product`), which XLA fuses into whatever reads it (the ``exp`` of the
    update rule) instead of running a dot that produces a single row.
    """
    if _FUSED_ROWS[0] and layer["w"].shape[-1] == 1:
        return rowwise_product(layer["w"], x) + layer["b"][..., :, None]
    return matmul(layer["w"], x) + layer["b"][..., :, None]


# A GRU whose input has at most this many features (the processed gradient: 1 or 2) computes its
# input projection as a sum of scaled rows instead of a dot. XLA then fuses it into the gates'
# elementwise code, so the [3H, N] projection never goes through memory (a dot with 1-2
# contracted features streams its operands for almost no arithmetic).
ROWWISE_FEATURES = 3


def rowwise_matmul(w: Array, x: Array) -> Array:
    """:func:`matmul` as a sum over input rows, ``Σ_i w[..., i, :, None] · x[..., i, None, :]``.

    The same contraction, summed in input order; meant for few input features (``in ≤``
    :data:`ROWWISE_FEATURES`).
    """
    total = w[..., 0, :, None] * x[..., 0, None, :]
    for i in range(1, x.shape[-2]):
        total = total + w[..., i, :, None] * x[..., i, None, :]
    return total


# A GRU with at most this many hidden units computes its recurrent projection with
# :func:`rowwise_product` too, so that the whole cell (projections, gates, new state) is one fused
# loop over the coordinates, and a layer with one output is fused into what reads it, but only
# inside :func:`fused_rows` (which `coordinatewise` enters where the network runs on all of an
# unvmapped agent's coordinates at once). Measured on a 2-core EPYC (hidden 8): one GRU step 26 ->
# 13 ns per coordinate on 37k-100k contiguous coordinates, but 2-4x slower than the dots inside
# the CPU block loop of a vmapped population, where each block is a strided slice.
ROWWISE_HIDDEN = 8
_FUSED_ROWS = [False]


@contextlib.contextmanager
def fused_rows():
    """Within this context (at trace time), :func:`gru_apply` and :func:`dense_apply` use the fused
    row sums described at :data:`ROWWISE_HIDDEN`. The numbers are the same to float32 rounding."""
    previous = _FUSED_ROWS[0]
    _FUSED_ROWS[0] = True
    try:
        yield
    finally:
        _FUSED_ROWS[0] = previous


@jax.custom_jvp
def rowwise_product(w: Array, x: Array) -> Array:
    """:func:`rowwise_matmul` whose derivatives are matmuls.

    The forward pass is the fusible sum of scaled rows; the tangents (and so, transposed, the
    backward pass) are ordinary matmuls: differentiating the row sum would turn the weights'
    cotangent into one reduction over the coordinates per weight, which is several times slower
    than the dot that contracts them all at once.
    """
    return rowwise_matmul(w, x)


def _product_tangent(w: Array, x: Array, w_dot, x_dot) -> Array:
    """``matmul(w_dot, x) + matmul(w, x_dot)``, the tangent of ``matmul(w, x)``, skipping symbolic
    zeros (a zero array when both are)."""
    terms = []
    if not isinstance(w_dot, SymbolicZero):
        terms.append(matmul(w_dot, x))
    if not isinstance(x_dot, SymbolicZero):
        terms.append(matmul(w, x_dot))
    if not terms:
        return jnp.zeros(jnp.broadcast_shapes(w.shape[:-2], x.shape[:-2]) + (w.shape[-1], x.shape[-1]), x.dtype)
    return sum(terms[1:], terms[0])


def _rowwise_product_jvp(primals, tangents):
    w, x = primals
    return rowwise_product(w, x), _product_tangent(w, x, *tangents)


rowwise_product.defjvp(_rowwise_product_jvp, symbolic_zeros=True)


def matmul(w: Array, x: Array) -> Array:
    """``w: [..., in, out]`` applied to feature-major ``x: [..., in, N]``, giving ``[..., out, N]``."""
    if w.ndim == 2 and x.ndim == 2:
        return jnp.einsum("io,in->on", w, x)
    # Leading batch axes: one batched matmul with the (tiny) weights broadcast over the batch,
    # rather than a plain contraction, which XLA follows with a transpose of the whole output.
    batch = jnp.broadcast_shapes(w.shape[:-2], x.shape[:-2])
    w_t = jnp.broadcast_to(jnp.swapaxes(w, -1, -2), batch + (w.shape[-1], w.shape[-2]))
    return jnp.einsum("...oi,...in->...on", w_t, jnp.broadcast_to(x, batch + x.shape[-2:]))


def mlp_apply(params: Params, x: Array) -> Array:
    """ReLU between layers, linear output. ``x: [..., in, N] -> [..., out, N]``."""
    num_layers = len(params)
    for i in range(num_layers):
        x = dense_apply(params[f"dense{i}"], x)
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
    # LeCun-normal depends only on fan_in, so the three gates' input kernels are one draw.
    wi = lecun_normal(key_in, (in_size, 3 * hidden_size))
    recurrent = orthogonal(key_h, 3, hidden_size)  # one orthogonal matrix per gate, as flax
    wh = jnp.concatenate([recurrent[0], recurrent[1], recurrent[2]], axis=1)
    return {
        "wi": wi,
        "wh": wh,
        "b": jnp.zeros((3 * hidden_size,), jnp.float32),
        "bhn": jnp.zeros((hidden_size,), jnp.float32),
    }


def gru_apply(params: Params, h: Array, x: Array) -> Array:
    """One GRU step on feature-major activations, ``h: [..., H, N]``, ``x: [..., in, N]`` -> new h.

    flax GRUCell equations: ``r = σ(Wir x + Whr h + br)``, ``z = σ(Wiz x + Whz h + bz)``,
    ``n = tanh(Win x + bin + r ⊙ (Whn h + bhn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``.
    """
    b, bhn = params["b"], params["bhn"]
    hidden = h.shape[-2]
    r, z, n = (slice(i * hidden, (i + 1) * hidden) for i in range(3))
    if x.shape[-2] <= ROWWISE_FEATURES:
        # 1-2 inputs (the processed gradient): scaled rows, fused with the gates below.
        x_r, x_z, x_n = (rowwise_matmul(params["wi"][..., gate], x) for gate in (r, z, n))
    else:
        x_r, x_z, x_n = gate_matmul(params["wi"], x, 3)
    if _FUSED_ROWS[0] and hidden <= ROWWISE_HIDDEN:
        # The recurrent projection as scaled rows too: the cell becomes one fused loop.
        h_r, h_z, h_n = (rowwise_product(params["wh"][..., gate], h) for gate in (r, z, n))
    else:
        h_r, h_z, h_n = gate_matmul(params["wh"], h, 3)
    reset = jax.nn.sigmoid(x_r + b[..., r, None] + h_r)
    update = jax.nn.sigmoid(x_z + b[..., z, None] + h_z)
    candidate = jnp.tanh(x_n + b[..., n, None] + reset * (h_n + bhn[..., :, None]))
    return (1.0 - update) * candidate + update * h


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def gate_matmul(w: Array, x: Array, num_gates: int) -> tuple[Array, ...]:
    """``matmul(w, x)`` split into ``num_gates`` equal row blocks (one per gate).

    The forward pass is one matmul with the stacked kernels. Its derivative is taken gate by gate
    (custom JVP, so forward and reverse mode both work): differentiating the slices of one
    matmul's output would pad each gate's cotangent back to all rows in the backward pass, which
    XLA's CPU backend turns into slow element-by-element code; per-gate matmuls avoid the pads.
    """
    out = matmul(w, x)
    size = out.shape[-2] // num_gates
    return tuple(out[..., i * size:(i + 1) * size, :] for i in range(num_gates))


def _gate_matmul_jvp(num_gates, primals, tangents):
    w, x = primals
    w_dot, x_dot = tangents
    size = w.shape[-1] // num_gates
    out_tangents = []
    for i in range(num_gates):
        columns = slice(i * size, (i + 1) * size)
        gate_w_dot = w_dot if isinstance(w_dot, SymbolicZero) else w_dot[..., columns]
        out_tangents.append(_product_tangent(w[..., columns], x, gate_w_dot, x_dot))
    return gate_matmul(w, x, num_gates), tuple(out_tangents)


gate_matmul.defjvp(_gate_matmul_jvp, symbolic_zeros=True)
