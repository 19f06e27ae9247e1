"""Learned-optimizer parameter files (``.o4r``): architecture + meta-parameters + provenance.

Portable and pickle-free (layout in ``docs/optimizer_file_format.md``)::

    bytes 0-7    magic  89 4F 34 52 0D 0A 1A 0A  ("\\x89O4R\\r\\n\\x1a\\n", PNG-style)
    bytes 8-11   format version, uint32 little-endian (1)
    bytes 12-19  header length H, uint64 little-endian
    H bytes      UTF-8 JSON header (space-padded so the data starts at a multiple of 8)
    the rest     the tensors, raw little-endian float32, C order, back to back

The header names the architecture and its config, carries the caller's provenance ``info``,
a table of tensors (name, shape, dtype, offset, nbytes) and the SHA-256 of the data. ``load``
checks everything and raises :class:`~optim4rl.errors.ParameterFileError` with one line saying
what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optim4rl.errors import ParameterFileError
from optim4rl.o4r_format import describe_mismatch as _describe_mismatch
from optim4rl.o4r_format import DTYPE as _DTYPE
from optim4rl.o4r_format import FORMAT_VERSION, MAGIC, parse_container
from optim4rl.o4r_format import PREAMBLE as _PREAMBLE
from optim4rl.optimizers.base import LearnedOptimizer, MetaParams, named_leaves
from optim4rl.optimizers.registry import LEARNED

FORMAT_NAME = "optim4rl learned optimizer"
_DATA_ALIGNMENT = 8


def save(path: str | os.PathLike, opt: LearnedOptimizer, phi: MetaParams,
         info: dict[str, Any] | None = None) -> pathlib.Path:
    """Write ``opt``'s architecture, the meta-parameters ``phi`` and ``info`` to ``path``.

    ``info`` is free-form JSON provenance (command, config, seed, code version, ...). The file is
    written to a temporary file beside ``path`` and moved into place, so a reader never sees a
    half-written file. Returns the path.
    """
    path = pathlib.Path(path)
    if not isinstance(opt, LearnedOptimizer) or LEARNED.get(type(opt).name) is not type(opt):
        raise ValueError(f"save expects a learned optimizer ({', '.join(LEARNED)}), got {opt!r}")
    expected = opt.meta_shapes()
    named = named_leaves(phi)
    got = {name: tuple(np.shape(leaf)) for name, leaf in named}
    if got != expected:
        raise ValueError(f"meta-parameters do not match the {opt.name} architecture: "
                         f"{_describe_mismatch(got, expected)}")
    for name, leaf in named:
        if not np.isfinite(np.asarray(leaf)).all():
            raise ParameterFileError(f"refusing to save {path}: meta-parameter '{name}' holds "
                                     "non-finite values (NaN or inf)")
    if path.is_dir():
        raise ParameterFileError(f"cannot save to {path}: it is a directory; give a file name")

    tensors, buffers, offset = [], [], 0
    for name, leaf in named:
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)), dtype=_DTYPE)
        buffers.append(array.tobytes(order="C"))
        tensors.append({"name": name, "shape": list(array.shape), "dtype": "float32",
                        "offset": offset, "nbytes": array.nbytes})
        offset += array.nbytes
    data = b"".join(buffers)

    from optim4rl import __version__

    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "architecture": opt.name,
        "config": opt.config(),
        "info": {} if info is None else info,
        "library_version": __version__,
        "tensors": tensors,
        "data_nbytes": len(data),
        "data_sha256": hashlib.sha256(data).hexdigest(),
    }
    try:
        header_bytes = json.dumps(header, sort_keys=True, allow_nan=False,
                                  default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ValueError(f"info must be JSON-serialisable: {error}") from None
    header_bytes += b" " * (-(_PREAMBLE.size + len(header_bytes)) % _DATA_ALIGNMENT)
    blob = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + data
    _write_atomically(path, blob)
    return path


def load(path: str | os.PathLike) -> tuple[LearnedOptimizer, MetaParams, dict[str, Any]]:
    """Read a ``.o4r`` file: returns ``(architecture, meta-parameters, info)``.

    Raises ParameterFileError (one line, starting with the path) when the file is missing, not an
    ``.o4r`` file, of an unknown format version, truncated, corrupt (checksum), of an unknown
    architecture, or holds tensors that do not match the architecture.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ParameterFileError(f"{path}: no such optimizer parameter file") from None
    except OSError as error:
        raise ParameterFileError(f"{path}: cannot read: {error.strerror or error}") from None

    header, arrays = parse_container(raw, path)
    architecture = header["architecture"]
    if architecture not in LEARNED:
        raise ParameterFileError(f"{path}: unknown optimizer architecture '{architecture}' "
                                 f"(known: {', '.join(LEARNED)})")
    missing = _missing_config_fields(architecture, header["config"])
    if missing:
        raise ParameterFileError(f"{path}: the {architecture} config in the file lacks "
                                 f"{', '.join(missing)}; refusing to guess their values")
    try:
        opt = LEARNED[architecture].from_config(header["config"])
    except (TypeError, ValueError) as error:
        raise ParameterFileError(f"{path}: bad {architecture} config in file: {error}") from None

    abstract = jax.eval_shape(opt.init_meta, jax.random.key(0))
    expected_named = named_leaves(abstract)
    expected = {name: tuple(leaf.shape) for name, leaf in expected_named}
    got = {name: tuple(array.shape) for name, array in arrays.items()}
    if got != expected:
        raise ParameterFileError(f"{path}: tensors do not match the {architecture} architecture "
                                 f"{opt.config()}: {_describe_mismatch(got, expected)}")
    leaves = [jnp.asarray(arrays[name], jnp.float32) for name, _ in expected_named]
    phi = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)
    return opt, phi, header["info"]


# Architecture fields added after files were first written, whose defaults reproduce exactly what
# those older files computed; a file may lack these, and no others.
_FIELDS_ADDED_LATER = {"optim4rl": frozenset({"log_scale", "sign_bias", "sign_flip"})}


def _missing_config_fields(architecture: str, config: dict) -> list[str]:
    import dataclasses

    fields = [f.name for f in dataclasses.fields(LEARNED[architecture]) if f.init]
    later = _FIELDS_ADDED_LATER.get(architecture, frozenset())
    return [name for name in fields if name not in config and name not in later]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, (pathlib.PurePath, tuple, set)):
        return str(value) if isinstance(value, pathlib.PurePath) else list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _write_atomically(path: pathlib.Path, blob: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise ParameterFileError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(blob)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; a parameter file is meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
