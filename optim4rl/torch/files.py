"""Reading ``.o4r`` learned-optimizer files without JAX: architecture, config, φ, provenance.

The format (docs/optimizer_file_format.md) is a fixed preamble, a JSON header and raw little-endian
float32 tensors, so a JSON parser and ``numpy.frombuffer`` suffice. This reader performs the same
checks as :func:`optim4rl.optimizers.load` and raises the same one-line
:class:`~optim4rl.errors.ParameterFileError` messages; it only imports NumPy.

Sources are named as in :func:`optim4rl.make_optimizer`: ``"ARCH:NAME"`` for a shipped
pretrained file (``"optim4rl:grid6"`` reads ``optim4rl/pretrained/grid6.o4r``), ``"ARCH:PATH.o4r"``
or just a path for a file of your own.
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from typing import NamedTuple

import numpy as np

from optim4rl.errors import ConfigError, ParameterFileError
from optim4rl.o4r_format import describe_mismatch as _describe_mismatch
from optim4rl.o4r_format import parse_container
from optim4rl.torch.architectures import ARCHITECTURES, check_config, meta_shapes



class O4RFile(NamedTuple):
    """What a ``.o4r`` file holds, read without JAX."""

    architecture: str  # "optim4rl", "l2l", "lin" or "star"
    config: dict  # every architecture field, defaults filled in for fields the file predates
    tensors: dict  # "gru_m/wi" -> float32 numpy array, in the file's order
    info: dict  # provenance written by whoever saved the file
    path: str
    sha256: str  # of the tensor data (the header's data_sha256)


def pretrained_names() -> list[str]:
    """Names of the shipped pretrained files (``optim4rl/pretrained/NAME.o4r``)."""
    folder = importlib.resources.files("optim4rl").joinpath("pretrained")
    return sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".o4r"))


def resolve(source: str | os.PathLike) -> tuple[str | None, str]:
    """``(architecture named in the spec or None, source)`` of a file spec.

    ``"optim4rl:grid6"`` -> ``("optim4rl", "grid6")``; ``"runs/x/opt.o4r"`` -> ``(None, ...)``.
    A prefix that is not an architecture name (``C:\\opt.o4r``) is part of the path.
    """
    if isinstance(source, os.PathLike):
        return None, os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"file must be a path or a spec such as 'optim4rl:grid6', got {source!r}")
    prefix, sep, rest = source.strip().partition(":")
    if sep and prefix.strip().lower() in ARCHITECTURES:
        rest = rest.strip()
        if not rest:
            raise ConfigError(f"'{source}': give a source after the colon: PATH.o4r or a "
                              f"pretrained name ({', '.join(pretrained_names())})")
        return prefix.strip().lower(), rest
    return None, source.strip()


def read(source: str | os.PathLike) -> O4RFile:
    """Read a ``.o4r`` file named by a path, ``"ARCH:PATH"`` or ``"ARCH:PRETRAINED"``."""
    spec_architecture, source = resolve(source)
    looks_like_path = source.endswith(".o4r") or os.sep in source or "/" in source
    if looks_like_path or os.path.isfile(source):
        path = pathlib.Path(source)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ParameterFileError(f"{path}: no such optimizer parameter file") from None
        except OSError as error:
            raise ParameterFileError(f"{path}: cannot read: {error.strerror or error}") from None
    else:
        entry = importlib.resources.files("optim4rl").joinpath("pretrained", f"{source}.o4r")
        if not entry.is_file():
            raise ConfigError(f"unknown pretrained optimizer '{source}' (pretrained: "
                              f"{', '.join(pretrained_names())}); give a path ending in .o4r for "
                              "a file of your own")
        path, raw = pathlib.Path(str(entry)), entry.read_bytes()
    loaded = parse(raw, str(path))
    if spec_architecture is not None and loaded.architecture != spec_architecture:
        raise ParameterFileError(f"{path}: holds a '{loaded.architecture}' optimizer, not "
                                 f"'{spec_architecture}' (use '{loaded.architecture}:{source}')")
    return loaded


def parse(raw: bytes, path: str = "<bytes>") -> O4RFile:
    """Check and decode the bytes of a ``.o4r`` file (``path`` only names it in errors)."""
    header, tensors = parse_container(raw, path)
    architecture = header["architecture"]
    if architecture not in ARCHITECTURES:
        raise ParameterFileError(f"{path}: unknown optimizer architecture '{architecture}' "
                                 f"(known: {', '.join(ARCHITECTURES)})")
    try:
        config = check_config(architecture, header["config"])
    except ValueError as error:
        raise ParameterFileError(f"{path}: bad {architecture} config in file: {error}") from None

    expected = meta_shapes(architecture, config)
    got = {name: tuple(array.shape) for name, array in tensors.items()}
    if got != expected:
        raise ParameterFileError(f"{path}: tensors do not match the {architecture} architecture "
                                 f"{config}: {_describe_mismatch(got, expected)}")
    return O4RFile(architecture, config, tensors, header["info"], path, header["data_sha256"])
