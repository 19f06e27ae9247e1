"""A fused CPU kernel for Optim4RL's coordinate-wise network, built on first use.

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
Supported: hidden size 8 with heads (16, 16) (the default) or linear heads (``rlc2024``), both
input processings, no learned sign flip; anything else runs as JAX.
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

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import sequential_vmap
from jax.experimental.custom_partitioning import custom_partitioning

SOURCE = Path(__file__).with_name("optim4rl_cpu.cc")
TARGET = "optim4rl_optim4rl_forward"
BACKWARD_TARGET = "optim4rl_optim4rl_backward"
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
                jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(lib.Optim4RLBackward),
                                            platform="cpu")
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


def kernel_for(opt):
    """``kernel(phi, columns) -> (direction, hidden_m, hidden_v)`` for an Optim4RL architecture,
    or ``None`` where the fused kernel does not apply (not on CPU, unsupported sizes, disabled)."""
    if not _enabled[0] or jax.default_backend() != "cpu" or opt.sign_flip:
        return None
    heads = _head_sizes(tuple(opt.head_sizes))
    if heads is None:
        return None
    lib = library()
    if lib is None or not lib.optim4rl_native_supports(opt.hidden_size, *heads):
        return None
    args = (opt.hidden_size, heads, opt.inputs == "raw", float(opt.log_eps), float(opt.eps),
            float(opt.log_scale))
    kernel = functools.partial(_forward, *args)
    # The backward pass (coordinatewise's custom VJP uses it where present): the VJP of the same
    # network, with φ's cotangent per member of the batch axes.
    kernel.backward = functools.partial(_backward, *args)
    return kernel


def pack_phi(phi: dict, raw_heads: tuple[int, int]) -> jax.Array:
    """φ as the one flat vector the kernel reads (layout in optim4rl_cpu.cc)."""
    def gru(p):
        return [p["wi"], p["wh"], p["b"], p["bhn"]]

    def head(p):
        return [leaf for i in range(len(p)) for leaf in (p[f"dense{i}"]["w"], p[f"dense{i}"]["b"])]

    leaves = gru(phi["gru_m"]) + head(phi["head_m"]) + gru(phi["gru_v"]) + head(phi["head_v"])
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])


def unpack_phi(flat: jax.Array, like: dict) -> dict:
    """The inverse of :func:`pack_phi` on the last axis of ``flat`` (its leading axes kept)."""
    lead, offset = flat.shape[:-1], [0]

    def take(leaf):
        piece = flat[..., offset[0]:offset[0] + leaf.size].reshape(lead + leaf.shape)
        offset[0] += leaf.size
        return piece.astype(leaf.dtype)

    def gru(p):
        return {k: take(p[k]) for k in ("wi", "wh", "b", "bhn")}

    def head(p):
        out = {}
        for i in range(len(p)):
            w = take(p[f"dense{i}"]["w"])
            out[f"dense{i}"] = {"w": w, "b": take(p[f"dense{i}"]["b"])}
        return out

    # The order of pack_phi: gru_m, head_m, gru_v, head_v.
    result = {"gru_m": gru(like["gru_m"]), "head_m": head(like["head_m"])}
    result["gru_v"] = gru(like["gru_v"])
    result["head_v"] = head(like["head_v"])
    return result


def _attributes(hidden, heads, raw, log_eps, eps, log_scale) -> dict:
    return dict(hidden=np.int64(hidden), head1=np.int64(heads[0]), head2=np.int64(heads[1]),
                raw=bool(raw), log_eps=np.float32(log_eps), eps=np.float32(eps),
                log_scale=np.float32(log_scale))


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


def _backward(hidden, heads, raw, log_eps, eps, log_scale, phi, columns, cotangents, batch_dims):
    """``(dphi, dcolumns)`` of the network at ``columns`` (``batch_dims`` leading batch axes):
    ``dphi`` has the batch axes too (each member's own use of φ), as ``coordinatewise`` needs."""
    grads, hidden_m, hidden_v = columns
    lead = jnp.broadcast_shapes(grads.shape[:-1], hidden_m.shape[:-2], hidden_v.shape[:-2])
    n = grads.shape[-1]
    batch = math.prod(lead)

    def rows(x, features=()):
        return jnp.broadcast_to(x, lead + features + (n,)).reshape((batch,) + features + (n,)).astype(jnp.float32)

    flat_phi = pack_phi(phi, heads)
    d_dir, d_hm, d_hv = cotangents
    # The input cotangents overwrite the output cotangents in place (each tile reads its own
    # before it writes): inside a scan XLA then needs neither new buffers nor copies for them.
    attributes = _attributes(hidden, heads, raw, log_eps, eps, log_scale)

    def call(flat_phi, g, hm, hv, d_dir, d_hm, d_hv):  # shapes of one shard under jax.sharding
        out_types = (jax.ShapeDtypeStruct((g.shape[0], flat_phi.size), jnp.float32),
                     jax.ShapeDtypeStruct(g.shape, jnp.float32),
                     jax.ShapeDtypeStruct(hm.shape, jnp.float32),
                     jax.ShapeDtypeStruct(hv.shape, jnp.float32))
        return jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential",
                                input_output_aliases={4: 1, 5: 2, 6: 3})(
            flat_phi, g, hm, hv, d_dir, d_hm, d_hv, **attributes)

    # Under jax.sharding every device differentiates its own rows.
    call = _sharded(call, "p, b n, b h n, b h n, b n, b h n, b h n -> b p, b n, b h n, b h n",
                    need_replication_factors=("p", "n", "h"))
    dphi, dg, dhm, dhv = call(flat_phi, rows(grads), rows(hidden_m, (hidden,)), rows(hidden_v, (hidden,)),
                              rows(d_dir), rows(d_hm, (hidden,)), rows(d_hv, (hidden,)))
    # Sum over the axes that are batch axes of the columns but not of the caller (broadcast ones
    # stay: coordinatewise's batch axes are leading and explicit).
    batch_shape = lead[:batch_dims]
    dphi = dphi.reshape(lead + (flat_phi.size,))
    dphi = dphi.sum(axis=tuple(range(batch_dims, len(lead)))) if len(lead) > batch_dims else dphi
    dphi = unpack_phi(dphi.reshape(batch_shape + (flat_phi.size,)), phi)

    dcolumns = (_unbroadcast(dg.reshape(lead + (n,)), grads),
                _unbroadcast(dhm.reshape(lead + (hidden, n)), hidden_m),
                _unbroadcast(dhv.reshape(lead + (hidden, n)), hidden_v))
    return dphi, dcolumns


def _unbroadcast(d: jax.Array, x: jax.Array) -> jax.Array:
    """``d`` (shape broadcast from ``x``'s) summed back to ``x``'s shape."""
    extra = d.ndim - x.ndim
    d = d.sum(axis=tuple(range(extra))) if extra else d
    axes = tuple(i for i, (a, b) in enumerate(zip(d.shape, x.shape)) if a != b)
    return (d.sum(axis=axes, keepdims=True) if axes else d).astype(x.dtype)


def _forward(hidden, heads, raw, log_eps, eps, log_scale, phi, columns):
    grads, hidden_m, hidden_v = columns
    lead = jnp.broadcast_shapes(grads.shape[:-1], hidden_m.shape[:-2], hidden_v.shape[:-2])
    n = grads.shape[-1]
    batch = math.prod(lead)
    g = jnp.broadcast_to(grads, lead + (n,)).reshape(batch, n).astype(jnp.float32)
    hm = jnp.broadcast_to(hidden_m, lead + (hidden, n)).reshape(batch, hidden, n)
    hv = jnp.broadcast_to(hidden_v, lead + (hidden, n)).reshape(batch, hidden, n)
    # The new hidden states overwrite the old ones in place (each tile reads its coordinates'
    # state before it writes it): in a training loop's carry, XLA then neither allocates fresh
    # output buffers every step nor copies them back into the carry.
    attributes = _attributes(hidden, heads, raw, log_eps, eps, log_scale)

    def call(flat_phi, g, hm, hv):  # shapes of one shard under jax.sharding
        out_types = (jax.ShapeDtypeStruct(g.shape, jnp.float32),
                     jax.ShapeDtypeStruct(hm.shape, jnp.float32),
                     jax.ShapeDtypeStruct(hv.shape, jnp.float32))
        return jax.ffi.ffi_call(TARGET, out_types, vmap_method="sequential",
                                input_output_aliases={2: 1, 3: 2})(flat_phi, g, hm, hv, **attributes)

    # Under jax.sharding every device updates its own rows.
    call = _sharded(call, "p, b n, b h n, b h n -> b n, b h n, b h n",
                    need_replication_factors=("p", "n", "h"))
    direction, hm, hv = call(pack_phi(phi, heads), g, hm.astype(jnp.float32), hv.astype(jnp.float32))
    return (direction.reshape(lead + (n,)), hm.reshape(lead + (hidden, n)),
            hv.reshape(lead + (hidden, n)))
