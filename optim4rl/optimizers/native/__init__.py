"""Fused CPU kernels for the recurrent learned optimizers' coordinate-wise networks, built on first use.

XLA runs the network (two GRU cells, two MLP heads, the update rule) as some twenty separate
loops over the coordinates, each reading and writing ``[features, N]`` activations. The kernel in
``optim4rl_cpu.cc`` runs it in one pass: 16 coordinates at a time, whole network in SIMD
registers, only the update and the new hidden states written back, spread over a small
persistent pool of worker threads of its own (one per core; ``OPTIM4RL_NATIVE_THREADS`` sets the
number). It is called as an XLA FFI custom call from inside jitted code, so nothing leaves the
compiled program.

It is compiled once per machine with the system's C++ compiler (``$CXX``, else ``c++``/``g++``/
``clang++``) against the XLA FFI headers that ship with jaxlib, with ``-march=native``, and cached
in ``$OPTIM4RL_CACHE_DIR`` (default ``~/.cache/optim4rl``) under a key made of the source, the
compiler, the jax version and the CPU's feature flags. Without a compiler, or with
``OPTIM4RL_NATIVE=0``, the network runs as plain JAX; the numbers agree to float32 rounding
(``tests/test_native.py``). It covers the forward pass (a training step, the drop-in's case)
and, as a second custom call, the backward pass (the vector-Jacobian product that meta-training
takes through every inner update: cotangents of φ per batch member, of the gradient and of both
hidden states).
Supported: Optim4RL with hidden size 8 and heads (16, 16) (the default) or linear heads
(``rlc2024``), both input processings, no learned sign flip; the one-GRU baselines L2L and Lin
(a second pair of calls, the same machinery) with the same sizes; STAR's update with its default
sizes (:func:`star_forward`: forward only, two passes over each tensor for its per-tensor feature
normalisation; its meta-gradient runs as JAX); anything else runs as JAX.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap, sequential_vmap
from jax.experimental.custom_partitioning import custom_partitioning

SOURCE = Path(__file__).with_name("optim4rl_cpu.cc")
TARGET = "optim4rl_optim4rl_forward"
BACKWARD_TARGET = "optim4rl_optim4rl_backward"
SINGLE_TARGET = "optim4rl_single_forward"  # L2L and Lin
SINGLE_BACKWARD_TARGET = "optim4rl_single_backward"
STAR_TARGET = "optim4rl_star_forward"  # STAR, forward only
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno")
NATIVE_FLAGS = ("-march=native",)

_lock = threading.Lock()
_state: dict = {"library": None, "tried": False, "error": None}
_enabled = [os.environ.get("OPTIM4RL_NATIVE", "1") != "0"]


@contextlib.contextmanager
def disabled():
    """Within this context (at trace time) Optim4RL's network runs as plain JAX."""
    previous = _enabled[0]
    _enabled[0] = False
    try:
        yield
    finally:
        _enabled[0] = previous


def cache_dir() -> Path:
    if os.environ.get("OPTIM4RL_CACHE_DIR"):
        return Path(os.environ["OPTIM4RL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optim4rl"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _build(compiler: str) -> Path:
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, jax.__version__,
                                    " ".join(FLAGS + NATIVE_FLAGS), _cpu_signature()]).encode())
    target_dir = cache_dir() / "native"
    library = target_dir / f"optim4rl_cpu-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    target_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (NATIVE_FLAGS, ()):  # -march=native, else the compiler's default target
        with tempfile.NamedTemporaryFile(dir=target_dir, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        command = [compiler, *FLAGS, *extra, "-I", include, str(SOURCE), "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(partial, library)  # atomic: concurrent builds cannot leave a half file
            return library
        partial.unlink(missing_ok=True)
        errors.append(result.stderr.strip().splitlines()[-1:] or ["failed"])
    raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors}")


def library() -> ctypes.CDLL | None:
    """The built and registered kernel library, or ``None`` where it cannot be built."""
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                compiler = _compiler()
                if compiler is None:
                    raise RuntimeError("no C++ compiler found (set $CXX)")
                lib = ctypes.CDLL(str(_build(compiler)))
                jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Optim4RLForward),
                                            platform="cpu")
                for target, symbol in ((BACKWARD_TARGET, lib.Optim4RLBackward),
                                       (SINGLE_TARGET, lib.SingleForward),
                                       (SINGLE_BACKWARD_TARGET, lib.SingleBackward),
                                       (STAR_TARGET, lib.StarForward)):
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
                lib.optim4rl_native_supports.restype = ctypes.c_int
                lib.optim4rl_native_supports.argtypes = [ctypes.c_int64] * 3
                _state["library"] = lib
            except Exception as error:  # noqa: BLE001 -- any failure means: run as JAX
                _state["error"] = f"{type(error).__name__}: {error}"
                warnings.warn(f"optim4rl: the fused CPU kernel is not available ({_state['error']}); "
                              "Optim4RL's network runs as plain JAX", RuntimeWarning, stacklevel=2)
        return _state["library"]


def status() -> str:
    """One line for run records and benchmarks: ``native``, ``off``, or why it is not built."""
    if not _enabled[0]:
        return "off"
    if library() is not None:
        return "native"
    return f"unavailable ({_state['error']})"


def _head_sizes(head_sizes: tuple[int, ...]) -> tuple[int, int] | None:
    if len(head_sizes) == 0:
        return 0, 0
    if len(head_sizes) == 2:
        return head_sizes
    return None


class _Spec(NamedTuple):
    """Which custom calls run a network, how φ is packed for them, and their attributes."""

    target: str
    backward_target: str
    hidden: int
    parts: tuple[tuple[str, str], ...]  # φ's sub-dicts in packing order: (name, "gru" | "head")
    attributes: tuple[tuple[str, object], ...]


# L2L's and Lin's update rules, as the kernel numbers them (kRuleL2L, kRuleLin).
_SINGLE_RULES = {"l2l": 0, "lin": 1}


def kernel_for(opt):
    """``kernel(phi, columns) -> outputs`` for a learned optimizer's coordinate-wise network, or
    ``None`` where the fused kernel does not apply (not on CPU, unsupported sizes, disabled).

    Optim4RL (columns ``(g, hidden_m, hidden_v)``) and the one-GRU baselines L2L and Lin
    (columns ``(g, hidden)``), each with hidden size 8 and heads (16, 16) or linear heads;
    Optim4RL without the learned sign flip. ``kernel.backward`` is the VJP of the same network."""
    if not _enabled[0] or jax.default_backend() != "cpu" or getattr(opt, "sign_flip", False):
        return None
    if opt.name not in ("optim4rl", *_SINGLE_RULES):
        return None
    heads = _head_sizes(tuple(opt.head_sizes))
    if heads is None:
        return None
    lib = library()
    if lib is None or not lib.optim4rl_native_supports(opt.hidden_size, *heads):
        return None
    sizes = dict(hidden=np.int64(opt.hidden_size), head1=np.int64(heads[0]), head2=np.int64(heads[1]))
    if opt.name == "optim4rl":
        spec = _Spec(TARGET, BACKWARD_TARGET, opt.hidden_size,
                     (("gru_m", "gru"), ("head_m", "head"), ("gru_v", "gru"), ("head_v", "head")),
                     tuple(dict(sizes, raw=opt.inputs == "raw", log_eps=np.float32(opt.log_eps),
                                eps=np.float32(opt.eps), log_scale=np.float32(opt.log_scale)).items()))
    else:
        spec = _Spec(SINGLE_TARGET, SINGLE_BACKWARD_TARGET, opt.hidden_size,
                     (("gru", "gru"), ("head", "head")),
                     tuple(dict(sizes, rule=np.int64(_SINGLE_RULES[opt.name]),
                                p=np.float32(getattr(opt, "p", 1.0)),
                                eps=np.float32(getattr(opt, "eps", 1e-8))).items()))
    kernel = functools.partial(_forward, spec)
    # The backward pass (coordinatewise's custom VJP uses it where present): the VJP of the same
    # network, with φ's cotangent per member of the batch axes.
    kernel.backward = functools.partial(_backward, spec)
    return kernel


def _gru_leaves(p):
    return [p["wi"], p["wh"], p["b"], p["bhn"]]


def _head_leaves(p):
    return [leaf for i in range(len(p)) for leaf in (p[f"dense{i}"]["w"], p[f"dense{i}"]["b"])]


def pack_phi(phi: dict, parts: tuple[tuple[str, str], ...]) -> jax.Array:
    """φ as the one flat vector the kernel reads (layout in optim4rl_cpu.cc): the sub-dicts
    ``parts`` names, in that order, each GRU as wi, wh, b, bhn and each head layer as w, b."""
    leaves = []
    for name, kind in parts:
        leaves += _gru_leaves(phi[name]) if kind == "gru" else _head_leaves(phi[name])
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])


def unpack_phi(flat: jax.Array, like: dict, parts: tuple[tuple[str, str], ...]) -> dict:
    """The inverse of :func:`pack_phi` on the last axis of ``flat`` (its leading axes kept)."""
    lead, offset = flat.shape[:-1], [0]

    def take(leaf):
        piece = flat[..., offset[0]:offset[0] + leaf.size].reshape(lead + leaf.shape)
        offset[0] += leaf.size
        return piece.astype(leaf.dtype)

    result = {}
    for name, kind in parts:
        p = like[name]
        if kind == "gru":
            result[name] = {k: take(p[k]) for k in ("wi", "wh", "b", "bhn")}
        else:
            result[name] = {}
            for i in range(len(p)):
                w = take(p[f"dense{i}"]["w"])
                result[name][f"dense{i}"] = {"w": w, "b": take(p[f"dense{i}"]["b"])}
    return result


def _sharded(call, rule: str, **rule_factors):
    """``call`` (an ``ffi_call`` on ``[batch, ...]`` rows, φ first) under ``jax.sharding``: each
    device runs it on its own rows, instead of XLA gathering every input and running the whole
    call on every device. Only the batch axis is split (``rule`` names it ``b``; every other axis
    is replicated). On one device it lowers to the plain call."""
    def rows_sharding(mesh, shapes):
        spec = shapes[0].sharding.spec  # the first result's rows decide, for every operand
        batch = spec[0] if len(spec) else None
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch))

    def infer(mesh, arg_shapes, result_shape):  # the GSPMD partitioner: follow g's rows
        return tuple(rows_sharding(mesh, arg_shapes[1:]) for _ in result_shape)

    def partition(mesh, arg_shapes, result_shape):
        rows = rows_sharding(mesh, result_shape)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return (mesh, call, tuple(rows for _ in result_shape),
                (replicated,) + tuple(rows for _ in arg_shapes[1:]))

    wrapped = custom_partitioning(call)
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                          sharding_rule=rule, **rule_factors)
    # Under a plain vmap (one φ per member, e.g. several optimizers at once; coordinatewise
    # folds the common case, a shared φ, into the batch axis itself) one call per member.
    return sequential_vmap(wrapped)


def _rows(columns, hidden):
    """The columns ``(g, *hidden states)`` broadcast to their common leading axes and flattened
    to ``[batch, n]`` and ``[batch, hidden, n]`` rows; returns ``(lead, rows)``."""
    grads, *states = columns
    lead = jnp.broadcast_shapes(grads.shape[:-1], *(h.shape[:-2] for h in states))
    n, batch = grads.shape[-1], math.prod(lead)

    def rows(x, features):
        return jnp.broadcast_to(x, lead + features + (n,)).reshape((batch,) + features + (n,)).astype(jnp.float32)

    return lead, [rows(grads, ())] + [rows(h, (hidden,)) for h in states]


def _forward(spec: _Spec, phi, columns):
    states = len(columns) - 1
    lead, rows = _rows(columns, spec.hidden)
    n = columns[0].shape[-1]
    # The new hidden states overwrite the old ones in place (each tile reads its coordinates'
    # state before it writes it): in a training loop's carry, XLA then neither allocates fresh
    # output buffers every step nor copies them back into the carry.
    def call(flat_phi, g, *hs):  # shapes of one shard under jax.sharding
        out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (g, *hs))
        return jax.ffi.ffi_call(spec.target, out_types, vmap_method="sequential",
                                input_output_aliases={2 + i: 1 + i for i in range(states)})(
            flat_phi, g, *hs, **dict(spec.attributes))

    # Under jax.sharding every device updates its own rows.
    columns_rule = "b n" + ", b h n" * states
    call = _sharded(call, f"p, {columns_rule} -> {columns_rule}",
                    need_replication_factors=("p", "n", "h"))
    outputs = call(pack_phi(phi, spec.parts), *rows)
    return (outputs[0].reshape(lead + (n,)),) + tuple(
        h.reshape(lead + (spec.hidden, n)) for h in outputs[1:])


def _backward(spec: _Spec, phi, columns, cotangents, batch_dims):
    """``(dphi, dcolumns)`` of the network at ``columns`` (``batch_dims`` leading batch axes):
    ``dphi`` has the batch axes too (each member's own use of φ), as ``coordinatewise`` needs."""
    states = len(columns) - 1
    lead, rows = _rows(columns, spec.hidden)
    _, cotangent_rows = _rows(tuple(cotangents), spec.hidden)
    n = columns[0].shape[-1]
    flat_phi = pack_phi(phi, spec.parts)

    # The input cotangents overwrite the output cotangents in place (each tile reads its own
    # before it writes): inside a scan XLA then needs neither new buffers nor copies for them.
    def call(flat_phi, *operands):  # shapes of one shard under jax.sharding
        g, hs = operands[0], operands[1:1 + states]
        out_types = (jax.ShapeDtypeStruct((g.shape[0], flat_phi.size), jnp.float32),) + tuple(
            jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (g, *hs))
        return jax.ffi.ffi_call(spec.backward_target, out_types, vmap_method="sequential",
                                input_output_aliases={2 + states + i: 1 + i for i in range(states + 1)})(
            flat_phi, *operands, **dict(spec.attributes))

    # Under jax.sharding every device differentiates its own rows.
    columns_rule = "b n" + ", b h n" * states
    call = _sharded(call, f"p, {columns_rule}, {columns_rule} -> b p, {columns_rule}",
                    need_replication_factors=("p", "n", "h"))
    dphi, *dcolumns = call(flat_phi, *rows, *cotangent_rows)
    # Sum over the axes that are batch axes of the columns but not of the caller (broadcast ones
    # stay: coordinatewise's batch axes are leading and explicit).
    batch_shape = lead[:batch_dims]
    dphi = dphi.reshape(lead + (flat_phi.size,))
    dphi = dphi.sum(axis=tuple(range(batch_dims, len(lead)))) if len(lead) > batch_dims else dphi
    dphi = unpack_phi(dphi.reshape(batch_shape + (flat_phi.size,)), phi, spec.parts)
    features = [()] + [(spec.hidden,)] * states
    dcolumns = tuple(_unbroadcast(d.reshape(lead + f + (n,)), x)
                     for d, f, x in zip(dcolumns, features, columns))
    return dphi, dcolumns


def _unbroadcast(d: jax.Array, x: jax.Array) -> jax.Array:
    """``d`` (shape broadcast from ``x``'s) summed back to ``x``'s shape."""
    extra = d.ndim - x.ndim
    d = d.sum(axis=tuple(range(extra))) if extra else d
    axes = tuple(i for i, (a, b) in enumerate(zip(d.shape, x.shape)) if a != b)
    return (d.sum(axis=axes, keepdims=True) if axes else d).astype(x.dtype)


# STAR's kernel: its default sizes (star.py), the length of one row of its coefficients.
STAR_SIZES = {"hidden_size": 4, "hidden_layers": 2, "momentum_decays": 3, "rms_decays": 1,
              "adafactor_decays": 3}
STAR_COEF = 7 + 28 * 4 + 4 + 16 + 4 + 8 + 2 + 1


def star_supported(opt) -> bool:
    """Whether :func:`star_forward` runs this STAR architecture (on CPU, the kernel built)."""
    if not _enabled[0] or jax.default_backend() != "cpu":
        return False
    sizes = {"hidden_size": opt.hidden_size, "hidden_layers": opt.hidden_layers,
             "momentum_decays": len(opt.momentum_decays), "rms_decays": len(opt.rms_decays),
             "adafactor_decays": len(opt.adafactor_decays)}
    return sizes == STAR_SIZES and library() is not None


def star_forward(coef, grads, params, momentum, rms, adafactor, leaf_sizes, exp_mult, nominal):
    """STAR's update on flat rows (``[..., n]``; accumulators ``[..., 3 | 1 | 3, n]``), the
    tensors being the runs of ``leaf_sizes`` coordinates: ``(delta, momentum', rms',
    adafactor')``. ``coef`` (``[..., STAR_COEF]``) packs the decays, the MLP (the step
    embedding folded into the first bias) and the learning rate, as star.py does. Leading axes
    are batch axes, one row each; a ``vmap`` adds one more (one call for the whole population),
    and under ``jax.sharding`` every device runs its own rows. The new accumulators overwrite the
    old ones in place."""
    offsets = tuple(int(x) for x in np.cumsum([0, *leaf_sizes]))
    operands = tuple(jnp.asarray(x, jnp.float32)
                     for x in (coef, grads, params, momentum, rms, adafactor))
    return _star_batched(offsets, float(exp_mult), float(nominal))(*operands)


@functools.lru_cache(maxsize=None)
def _star_batched(offsets: tuple[int, ...], exp_mult: float, nominal: float):
    call = _star_sharded(offsets, exp_mult, nominal)

    def rows(coef, grads, params, momentum, rms, adafactor):
        lead, n = grads.shape[:-1], grads.shape[-1]
        batch = math.prod(lead)
        flat = (coef.reshape(batch, -1), grads.reshape(batch, n), params.reshape(batch, n),
                momentum.reshape(batch, -1, n), rms.reshape(batch, -1, n),
                adafactor.reshape(batch, -1, n))
        outputs = call(*flat)
        return tuple(out.reshape(x.shape) for out, x in zip(outputs, (grads, momentum, rms, adafactor)))

    batched = custom_vmap(rows)

    @batched.def_vmap
    def rule(axis_size, in_batched, *operands):  # the vmapped axis becomes one more batch axis
        operands = [x if b else jnp.broadcast_to(x, (axis_size,) + x.shape)
                    for x, b in zip(operands, in_batched)]
        return batched(*operands), (True,) * 4

    return batched


def _star_sharded(offsets, exp_mult, nominal):
    """The custom call on ``[batch, ...]`` rows, each device on its own rows under jax.sharding
    (as :func:`_sharded`, with the coefficients split by rows too)."""
    def call(coef, grads, params, momentum, rms, adafactor):
        out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                          for x in (grads, momentum, rms, adafactor))
        ffi = jax.ffi.ffi_call(STAR_TARGET, out_types, input_output_aliases={3: 1, 4: 2, 5: 3})
        return tuple(ffi(coef, grads, params, momentum, rms, adafactor,
                         offsets=np.asarray(offsets, np.int64), exp_mult=np.float32(exp_mult),
                         nominal=np.float32(nominal)))

    def rows_sharding(mesh, shapes):
        spec = shapes[0].sharding.spec
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0] if len(spec) else None))

    def infer(mesh, arg_shapes, result_shape):
        return tuple(rows_sharding(mesh, arg_shapes[1:]) for _ in result_shape)

    def partition(mesh, arg_shapes, result_shape):
        rows = rows_sharding(mesh, result_shape)
        return mesh, call, tuple(rows for _ in result_shape), tuple(rows for _ in arg_shapes)

    wrapped = custom_partitioning(call)
    wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                          sharding_rule="b c, b n, b n, b m n, b r n, b f n -> b n, b m n, b r n, b f n",
                          need_replication_factors=("c", "n", "m", "r", "f"))
    return wrapped
