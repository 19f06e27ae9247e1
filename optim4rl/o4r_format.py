"""The `.o4r` file format's header checks, shared by the JAX loader and the JAX-free PyTorch
reader (this module imports neither JAX nor torch)."""

from __future__ import annotations

import json
from typing import Any

from optim4rl.errors import ParameterFileError


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
