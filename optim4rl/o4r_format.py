"""The `.o4r` container (preamble, JSON header, float32 tensors) and its checks, shared by the
JAX loader and the JAX-free PyTorch reader (this module imports neither JAX nor torch)."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from optim4rl.errors import ParameterFileError

MAGIC = b"\x89O4R\r\n\x1a\n"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sIQ")  # magic, format version, header length
DTYPE = "<f4"


def parse_container(raw: bytes, path: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Checks the bytes of a `.o4r` file and returns its header and its tensors by name (finite
    float32 arrays). Every failure is one ParameterFileError line starting with `path`; the
    architecture and its config are the caller's to check."""
    if not raw:
        raise ParameterFileError(f"{path}: empty file, not an optimizer parameter file (.o4r)")
    if raw[:len(MAGIC)] != MAGIC[:len(raw)]:
        raise ParameterFileError(f"{path}: not an optimizer parameter file (.o4r): bad magic bytes")
    if len(raw) < PREAMBLE.size:
        raise ParameterFileError(f"{path}: truncated .o4r file ({len(raw)} bytes, shorter than "
                                 "its fixed preamble)")
    _, version, header_length = PREAMBLE.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise ParameterFileError(f"{path}: unsupported .o4r format version {version} (this "
                                 f"optim4rl reads version {FORMAT_VERSION})")
    data_start = PREAMBLE.size + header_length
    if len(raw) < data_start:
        raise ParameterFileError(f"{path}: truncated .o4r file (header cut off: {len(raw)} of at "
                                 f"least {data_start} bytes)")
    header = parse_header(path, raw[PREAMBLE.size:data_start])
    data = raw[data_start:]
    if len(data) < header["data_nbytes"]:
        raise ParameterFileError(f"{path}: truncated .o4r file (tensor data has {len(data)} of "
                                 f"{header['data_nbytes']} bytes)")
    if len(data) > header["data_nbytes"]:
        raise ParameterFileError(f"{path}: corrupt .o4r file ({len(data) - header['data_nbytes']} "
                                 "unexpected bytes after the tensor data)")
    if hashlib.sha256(data).hexdigest() != header["data_sha256"]:
        raise ParameterFileError(f"{path}: corrupt .o4r file (checksum mismatch in tensor data)")
    tensors = {}
    for entry in header["tensors"]:
        end = entry["offset"] + entry["nbytes"]
        if (entry["dtype"] != "float32" or end > len(data)
                or entry["nbytes"] != 4 * int(np.prod(entry["shape"], dtype=np.int64))):
            raise ParameterFileError(f"{path}: corrupt .o4r file (bad tensor table entry "
                                     f"'{entry['name']}')")
        array = np.frombuffer(data, dtype=DTYPE, count=entry["nbytes"] // 4, offset=entry["offset"])
        if not np.isfinite(array).all():
            raise ParameterFileError(f"{path}: tensor '{entry['name']}' holds non-finite values "
                                     "(NaN or inf); the file is unusable")
        tensors[entry["name"]] = array.reshape(entry["shape"]).astype(np.float32)
    return header, tensors


def parse_header(path: Any, header_bytes: bytes) -> dict[str, Any]:
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ParameterFileError(f"{path}: corrupt .o4r file (header is not valid JSON)") from None
    fields = {"architecture": str, "config": dict, "info": dict, "tensors": list,
              "data_nbytes": int, "data_sha256": str}
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t)
                                           for k, t in fields.items()):
        raise ParameterFileError(f"{path}: corrupt .o4r file (header lacks required fields)")
    entry_fields = {"name": str, "shape": list, "dtype": str, "offset": int, "nbytes": int}
    names = set()
    for entry in header["tensors"]:
        if (not isinstance(entry, dict)
                or any(not isinstance(entry.get(k), t) for k, t in entry_fields.items())
                or not all(isinstance(d, int) and d >= 0 for d in entry["shape"])
                or entry["offset"] < 0 or entry["nbytes"] < 0 or entry["name"] in names):
            raise ParameterFileError(f"{path}: corrupt .o4r file (bad tensor table)")
        names.add(entry["name"])
    return header


def describe_mismatch(got: dict[str, tuple], expected: dict[str, tuple]) -> str:
    parts = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing:
        parts.append(f"missing {missing}")
    if unexpected:
        parts.append(f"unexpected {unexpected}")
    for name in sorted(set(got) & set(expected)):
        if got[name] != expected[name]:
            parts.append(f"{name} has shape {got[name]}, expected {expected[name]}")
    return "; ".join(parts)
