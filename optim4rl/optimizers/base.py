"""What every learned optimizer shares: architecture vs. meta-parameters, and the optax wrapper.

A learned optimizer is split in two, as in the paper's notation ``U_φ``:

* the *architecture* (a frozen dataclass such as :class:`~optim4rl.optimizers.Optim4RL`): sizes,
  input processing, constants. Hashable, serialisable as a small JSON dict;
* the *meta-parameters* ``φ`` (``opt.init_meta(key)``): a nested dict of float32 arrays, the only
  thing meta-training changes.

``opt.transform(φ, learning_rate)`` closes over ``φ`` and returns an ordinary
``optax.GradientTransformation``. The update is a coordinate-wise network: all leaves of the
gradient pytree are flattened into one vector of ``N`` coordinates, the network runs once on the
batch ``[N, features]``, and the result is unflattened. Each subclass only writes
:meth:`LearnedOptimizer.init_state` and :meth:`LearnedOptimizer.step` on flat float32 vectors.

The gradient (and, for STAR, the parameters) enter the network through ``stop_gradient``: when
meta-training differentiates a loss through ``tx.update`` with respect to ``φ``, there are no
second-order terms (docs/paper_settings.md §1, §2).

On CPU the recurrent optimizers run their network through :func:`coordinatewise`: a vmapped
population in cache-sized blocks of coordinates, one agent's forward pass in one piece, and the
backward pass block by block, recomputing each block's activations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.custom_batching import custom_vmap
from jax.flatten_util import ravel_pytree

from optim4rl.optimizers import nets

Array = jax.Array
MetaParams = dict
LearningRate = float | Array | Callable[[Array], Array]


class GRUState(NamedTuple):
    """State of a one-GRU learned optimizer (L2L, Lin)."""

    hidden: Array  # [hidden_size, N]: one recurrent state per coordinate, zeros at init
    count: Array  # int32 number of updates done so far


def clip_enabled(grad_clip: Any) -> bool:
    """``None`` or a non-positive number disables the elementwise clip (reference convention)."""
    if grad_clip is None:
        return False
    if isinstance(grad_clip, numbers.Number):
        return grad_clip > 0
    return True  # an array or tracer: the caller asked for clipping


# -- coordinate-wise networks in cache-sized blocks ---------------------------------------------

# Coordinates per block when a coordinate-wise network runs on CPU (see `coordinatewise`); 0 or
# less runs the network on all coordinates at once, as on GPU. A block's activations then stay in
# the last-level cache ([16, 32k] float32 = 2 MiB per layer). Measured on a 2-core EPYC: the
# meta-gradient is fastest at 32k (16k: +20%, 64k: +25%), the forward pass at 32k-64k.
CPU_BLOCK_SIZE = 32768
# Whether the forward pass of one agent (no vmap) is blocked too. Measured on the same 2-core
# EPYC (one update, default and rlc2024 architectures, alternating runs): unblocked is 3-5x
# faster at 100k coordinates and 1.2-2x faster at 1M, because XLA runs the loop's small
# per-block kernels one after the other, while a vmapped population's blocked forward pass was
# 2-5x faster than unblocked (default architecture, 8 and 64 agents of 85k coordinates).
# The backward pass stays blocked in both cases: that is where blocking saves memory.
BLOCK_SINGLE_FORWARD = False
# Narrowest block along one agent's coordinates when a population is vmapped: the block then
# spans all agents, so each agent contributes only CPU_BLOCK_SIZE / agents coordinates.
MIN_BLOCK_WIDTH = 128

Network = Callable[[Any, tuple], tuple]


def coordinatewise(network: Network, phi: Any, columns: tuple, kernel: Network | None = None) -> tuple:
    """``network(phi, columns)``, computed in cache-sized blocks of coordinates on CPU.

    ``columns`` (and the tuple ``network`` returns) hold arrays whose last axis is the coordinate
    axis, ``[N]`` or ``[features, N]``. ``network`` must be coordinate-wise (output coordinate i
    depends only on ``phi`` and on coordinate i of the columns) and must accept leading batch axes
    on the columns and on the leaves of ``phi`` (``[..., features, n]`` and ``[..., in, out]``),
    as the functions of :mod:`optim4rl.optimizers.nets` do.

    Why: the network keeps ~24 activations per coordinate, so on a whole agent population
    (millions of coordinates) every layer streams [24, N] arrays through main memory, and
    reverse-mode differentiation stores all of them. On CPU this runs the coordinates in blocks
    of about :data:`CPU_BLOCK_SIZE` inside a loop, so the activations stay in cache (the forward
    pass of a single, unvmapped agent runs unblocked, which measured faster: see
    :data:`BLOCK_SINGLE_FORWARD`), and its
    backward pass (a custom VJP) recomputes each block's activations right before that block's
    vector-Jacobian product: nothing larger than the inputs and outputs is kept for the backward
    pass, and each block's forward and backward run on cached data. Under ``vmap`` (a population
    of agents) a custom batching rule makes each block span all agents, with fewer coordinates
    per agent, so that it stays cache-sized. Results equal the plain computation up to float32
    rounding (sums over coordinates are added block by block).

    ``kernel``, where given, is a fused implementation of the same network (same signature,
    columns with any leading batch axes, φ shared): the forward pass then runs through it, in one
    piece, and so does the backward pass where it has a ``backward(phi, columns, cotangents,
    batch_dims) -> (dphi, dcolumns)`` attribute (see :mod:`optim4rl.optimizers.native`).

    On GPU, or with ``CPU_BLOCK_SIZE <= 0``, this is just ``network(phi, columns)``. The blocked
    version supports jit, vmap and reverse-mode differentiation (what meta-training uses), not
    forward-mode (``jax.jvp``).
    """
    columns = tuple(columns)
    if CPU_BLOCK_SIZE <= 0 or jax.default_backend() != "cpu":
        return tuple(network(phi, columns))
    return tuple(_blocked(network, CPU_BLOCK_SIZE, kernel)(phi, columns))


def _block_layout(n: int, batch: int, block_size: int) -> tuple[int, int]:
    """``(width, num_blocks)`` along the coordinate axis for ``batch`` stacked problems of ``n``."""
    width = max(min(MIN_BLOCK_WIDTH, block_size), block_size // max(batch, 1))
    if n <= width:
        return n, 1
    num_blocks = -(-n // width)
    width = min(n, -(-(-(-n // num_blocks)) // 8) * 8)  # balanced, a multiple of 8 (vector lanes)
    return width, -(-n // width)


def _block_start(index: Array, width: int, n: int) -> Array:
    # The last block is shifted left to end at n: it overlaps its neighbour instead of padding.
    return jnp.minimum(index * width, n - width)


def _slice_block(x: Array, start: Array, width: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, width, axis=x.ndim - 1)


def _put_block(x: Array, block: Array, start: Array) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(x, block, start, axis=x.ndim - 1)


def _forward_blocks(network, kernel, block_size, batch_dims, phi, columns):
    """The network's outputs, block by block; columns carry ``batch_dims`` leading batch axes."""
    if kernel is not None:
        return tuple(kernel(phi, columns))  # fused: one pass, already cache-sized
    n = columns[0].shape[-1]
    width, num_blocks = _block_layout(n, math.prod(columns[0].shape[:batch_dims]), block_size)
    if batch_dims == 0 and not BLOCK_SINGLE_FORWARD:
        # One agent's coordinates, contiguous and in one piece: the fused-row kernels are faster.
        with nets.fused_rows():
            return tuple(network(phi, columns))
    if num_blocks == 1:
        return tuple(network(phi, columns))

    def run_block(start):
        return tuple(network(phi, tuple(_slice_block(c, start, width) for c in columns)))

    def body(step, outputs):
        # Last block first, so that the overlap ends up written by the block that owns it.
        start = _block_start(num_blocks - 1 - step, width, n)
        return tuple(_put_block(o, b, start) for o, b in zip(outputs, run_block(start)))

    shapes = jax.eval_shape(run_block, 0)
    outputs = tuple(jnp.zeros(s.shape[:-1] + (n,), s.dtype) for s in shapes)
    return jax.lax.fori_loop(0, num_blocks, body, outputs)


def _backward_blocks(network, kernel, block_size, batch_dims, phi, columns, cotangents):
    """``(dphi, dcolumns)``: per block, recompute the activations, then take their VJP.

    With batch axes, ``dphi`` has them too: every member of the batch gets the cotangent of its
    own use of ``φ`` (what a vmapped VJP must return; vmap sums it where φ is shared).
    """
    backward = getattr(kernel, "backward", None)
    if backward is not None:
        return backward(phi, columns, tuple(cotangents), batch_dims)  # fused, as the forward pass
    n = columns[0].shape[-1]
    batch_shape = columns[0].shape[:batch_dims]
    width, num_blocks = _block_layout(n, math.prod(batch_shape), block_size)
    # Broadcast over the batch, φ's cotangent is per member. Broadcasting costs nothing: the
    # network broadcasts its weights over the batch axes anyway.
    phi = jax.tree.map(lambda x: jnp.broadcast_to(x, batch_shape + x.shape), phi)

    def block_vjp(index, start):
        block = tuple(_slice_block(c, start, width) for c in columns)
        block_cotangents = tuple(_slice_block(c, start, width) for c in cotangents)
        # Coordinates of the overlap belong to the previous block: count them only once.
        owned = start + jax.lax.iota(jnp.int32, width) >= index * width
        block_cotangents = tuple(jnp.where(owned, c, jnp.zeros((), c.dtype))
                                 for c in block_cotangents)
        _, vjp = jax.vjp(lambda p, c: tuple(network(p, c)), phi, block)
        return vjp(block_cotangents)

    if num_blocks == 1:
        return block_vjp(0, 0)

    def body(step, carry):
        dphi, dcolumns = carry
        # Last block first: its (masked) overlap is then overwritten by the owning block.
        index = num_blocks - 1 - step
        start = _block_start(index, width, n)
        block_dphi, block_dcolumns = block_vjp(index, start)
        dphi = jax.tree.map(jnp.add, dphi, block_dphi)
        dcolumns = tuple(_put_block(d, b, start) for d, b in zip(dcolumns, block_dcolumns))
        return dphi, dcolumns

    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    return jax.lax.fori_loop(0, num_blocks, body, (zeros(phi), zeros(columns)))


def _with_batch_axis(axis_size: int, values: tuple, batched: tuple) -> tuple:
    return tuple(v if b else jnp.broadcast_to(v, (axis_size,) + v.shape)
                 for v, b in zip(values, batched))


def _vmap_with(fn, in_batched, *args):
    """Plain ``vmap`` (blocks not resized): for a batched φ, e.g. one φ per meta-training seed."""
    in_axes = jax.tree.map(lambda b: 0 if b else None, in_batched)
    outputs = jax.vmap(fn, in_axes=in_axes)(*args)
    return outputs, jax.tree.map(lambda _: True, outputs)


def _forward(network, block_size: int, batch_dims: int, kernel=None):
    """`_forward_blocks` for columns with `batch_dims` batch axes; vmap adds one more."""
    forward = functools.partial(_forward_blocks, network, kernel, block_size, batch_dims)
    batched_forward = custom_vmap(forward)

    @batched_forward.def_vmap
    def rule(axis_size, in_batched, phi, columns):
        phi_batched, columns_batched = in_batched
        if any(jax.tree.leaves(phi_batched)):
            return _vmap_with(forward, in_batched, phi, columns)
        columns = _with_batch_axis(axis_size, columns, columns_batched)
        outputs = _forward(network, block_size, batch_dims + 1, kernel)(phi, columns)
        return outputs, tuple(True for _ in outputs)

    return batched_forward


def _backward(network, block_size: int, batch_dims: int, kernel=None):
    """`_backward_blocks` for columns with `batch_dims` batch axes; vmap adds one more."""
    backward = functools.partial(_backward_blocks, network, kernel, block_size, batch_dims)
    batched_backward = custom_vmap(backward)

    @batched_backward.def_vmap
    def rule(axis_size, in_batched, phi, columns, cotangents):
        phi_batched, columns_batched, cotangents_batched = in_batched
        if any(jax.tree.leaves(phi_batched)):
            return _vmap_with(backward, in_batched, phi, columns, cotangents)
        columns = _with_batch_axis(axis_size, columns, columns_batched)
        cotangents = _with_batch_axis(axis_size, cotangents, cotangents_batched)
        grads = _backward(network, block_size, batch_dims + 1, kernel)(phi, columns, cotangents)
        return grads, jax.tree.map(lambda _: True, grads)

    return batched_backward


def _blocked(network, block_size: int, kernel=None):
    @jax.custom_vjp
    def blocked(phi, columns):
        return _forward(network, block_size, 0, kernel)(phi, columns)

    def blocked_fwd(phi, columns):
        # Residuals are the inputs only: the backward pass recomputes each block.
        return blocked(phi, columns), (phi, columns)

    def blocked_bwd(residuals, cotangents):
        phi, columns = residuals
        return _backward(network, block_size, 0, kernel)(phi, columns, tuple(cotangents))

    blocked.defvjp(blocked_fwd, blocked_bwd)
    return blocked


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
    """Base class of learned-optimizer architectures (frozen dataclasses; fields = config)."""

    name: ClassVar[str] = ""
    uses_params: ClassVar[bool] = False  # STAR reads the parameter values as a network input

    # -- what subclasses implement -------------------------------------------------------------

    def init_meta(self, key: Array) -> MetaParams:
        """Fresh meta-parameters ``φ`` (nested dict of float32 arrays) from a PRNG key."""
        raise NotImplementedError

    def init_state(self, num_coordinates: int) -> NamedTuple:
        """Optimizer state for ``num_coordinates`` scalar parameters (recurrent states at zero)."""
        raise NotImplementedError

    def step(self, phi: MetaParams, grads: Array, state: NamedTuple, params: Array | None,
             learning_rate: Array, leaf_sizes: tuple[int, ...]) -> tuple[Array, NamedTuple]:
        """One update on flat float32 vectors ``[N]``: returns ``(Δθ, new_state)``.

        ``grads`` is already clipped and stop-gradient-ed; ``params`` is given (stop-gradient-ed)
        only when ``uses_params``; ``leaf_sizes`` are the sizes of the original leaves in
        flattening order (STAR normalises its features per tensor).
        """
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------------

    def transform(self, phi: MetaParams, learning_rate: LearningRate,
                  grad_clip: float | None = None) -> optax.GradientTransformationExtraArgs:
        """The learned optimizer with meta-parameters ``phi`` as an optax transformation.

        Args:
          phi: meta-parameters from :meth:`init_meta` or :func:`~optim4rl.optimizers.load`; may be
            a tracer, the update is differentiable with respect to it.
          learning_rate: step size α (a float, an array, or an optax schedule of the step count).
          grad_clip: elementwise gradient clip applied before the network (``None`` or ≤ 0: off).

        ``tx.update(grads, state, params)`` returns the additive update (``optax.apply_updates``),
        each leaf in its parameter's dtype (the gradient's when ``params`` is not given); the
        network itself runs in float32. Extra keyword arguments to ``update`` are ignored.
        """
        clip = clip_enabled(grad_clip)

        def init_fn(params: Any) -> NamedTuple:
            flat, _ = ravel_pytree(params)
            return self.init_state(flat.size)

        def update_fn(updates: Any, state: NamedTuple, params: Any = None, **extra_args: Any):
            # Extra keyword arguments (optax's GradientTransformationExtraArgs, e.g. `value`)
            # are accepted and ignored, as optax's own optimizers do.
            del extra_args
            like = updates
            if params is not None and (jax.tree.structure(params)
                                       == jax.tree.structure(updates)):
                like = params
            dtypes = jax.tree.map(lambda leaf: jnp.result_type(leaf), like)
            grads, unravel = ravel_pytree(
                jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), updates))
            if clip:
                grads = jnp.clip(grads, -grad_clip, grad_clip)
            grads = jax.lax.stop_gradient(grads)
            flat_params = None
            if self.uses_params:
                if params is None:
                    raise ValueError(f"the {self.name} optimizer reads the parameters: call "
                                     "tx.update(grads, state, params)")
                flat_params = jax.lax.stop_gradient(ravel_pytree(params)[0].astype(jnp.float32))
            if callable(learning_rate):
                step_size = learning_rate(state.count)
            else:
                step_size = learning_rate
            leaf_sizes = tuple(int(leaf.size) for leaf in jax.tree_util.tree_leaves(updates))
            delta, new_state = self.step(phi, grads, state, flat_params,
                                         jnp.asarray(step_size, jnp.float32), leaf_sizes)
            # The network runs in float32; each update leaf then takes its parameter's dtype
            # (bf16 parameters get bf16 updates), as optax's optimizers do.
            delta = jax.tree.map(lambda leaf, dtype: leaf.astype(dtype), unravel(delta), dtypes)
            return delta, new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)

    def meta_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{"gru_m/wi": (2, 24), ...}``: the name and shape of every meta-parameter tensor."""
        abstract = jax.eval_shape(self.init_meta, jax.random.key(0))
        return {name: tuple(leaf.shape) for name, leaf in named_leaves(abstract)}

    def config(self) -> dict[str, Any]:
        """The architecture's fields as a JSON-ready dict (tuples become lists)."""
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LearnedOptimizer":
        """Inverse of :meth:`config`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown {cls.name} option(s) {unknown}; known: {sorted(known)}")
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in config.items():
            if isinstance(value, list):
                value = tuple(value)
            elif hints.get(key) is float and isinstance(value, int):
                value = float(value)
            kwargs[key] = value
        return cls(**kwargs)


def named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """``[("gru_m/wi", leaf), ...]`` for a nested dict of arrays, in JAX flattening order."""
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    named = []
    for path, leaf in leaves_with_paths:
        parts = []
        for entry in path:
            if not isinstance(entry, jax.tree_util.DictKey):
                raise ValueError("meta-parameters must be nested dicts of arrays")
            parts.append(str(entry.key))
        named.append(("/".join(parts), leaf))
    return named


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def freeze_sequences(instance: Any) -> None:
    """Turn list-valued fields into tuples, so that a frozen architecture stays hashable."""
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if isinstance(value, list):
            object.__setattr__(instance, field.name, tuple(value))


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, numbers.Real) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
