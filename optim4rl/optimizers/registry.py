"""Optimizers by name: learned architectures, hand-designed optax optimizers, pretrained files."""

from __future__ import annotations

import functools
import inspect
import pathlib
from typing import Any

import optax

from optim4rl.errors import ConfigError
from optim4rl.optimizers.base import clip_enabled
from optim4rl.optimizers.gru_optimizers import L2L, Lin, Optim4RL
from optim4rl.optimizers.star import STAR

LEARNED = {"optim4rl": Optim4RL, "l2l": L2L, "lin": Lin, "star": STAR}

# VeLO (Metz et al. 2022) is an optional baseline whose pretrained weights must be user-supplied.
OPTIONAL_LEARNED = ("velo",)

# optax optimizers whose update needs more than (grads, state, params), e.g. a loss function.
_EXCLUDED = frozenset({"lbfgs"})

PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent.parent / "pretrained"


@functools.cache
def hand_designed_names() -> tuple[str, ...]:
    """Every optax optimizer constructor whose first argument is ``learning_rate`` and whose
    update is the usual ``update(grads, state, params)``."""
    names = []
    for name in dir(optax):
        if name.startswith("_") or name.startswith("scale") or name in _EXCLUDED:
            continue
        constructor = getattr(optax, name)
        if not (inspect.isfunction(constructor) or isinstance(constructor, functools.partial)):
            continue
        try:
            parameters = list(inspect.signature(constructor).parameters)
        except (TypeError, ValueError):
            continue
        if parameters and parameters[0] == "learning_rate":
            names.append(name)
    return tuple(sorted(names))


def list_optimizers() -> list[str]:
    """Hand-designed names (``"adam"``, ...) followed by the learned ones (``"optim4rl"``, ...).

    A learned name is used as ``"NAME:init"``, ``"NAME:PATH.o4r"`` or ``"NAME:PRETRAINED"``.
    """
    return [*hand_designed_names(), *LEARNED, *OPTIONAL_LEARNED]


def list_pretrained() -> list[str]:
    """Names of the shipped meta-parameter files ``optim4rl/pretrained/NAME.o4r``."""
    return sorted(path.stem for path in PRETRAINED_DIR.glob("*.o4r"))


def describe_pretrained() -> dict[str, str]:
    """``"ARCH:NAME"`` (the spec to pass as ``--optimizer``) -> a one-line description, for every
    shipped file, read from its provenance record ``NAME.json`` beside it."""
    import json

    described = {}
    for name in list_pretrained():
        record_path = PRETRAINED_DIR / f"{name}.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            record = {}
        arch = record.get("optimizer") or "optim4rl"
        scale = str(record.get("scale") or "").split(";")[0].split(" (")[0].split(" with ")[0].strip()
        trained_on = record.get("trained_on") or []
        where = (", ".join(trained_on) if len(trained_on) <= 2 else f"{len(trained_on)} gridworlds")
        described[f"{arch}:{name}"] = (f"meta-trained on {where}" if where else "meta-trained") + (
            f" ({scale[:100]})" if scale else "")
    return described


def pretrained_path(name: str) -> pathlib.Path:
    """Path of a shipped pretrained optimizer; unknown name -> ConfigError listing the known."""
    path = PRETRAINED_DIR / f"{name}.o4r"
    if not path.is_file():
        known = ", ".join(list_pretrained()) or "none shipped yet"
        raise ConfigError(f"unknown pretrained optimizer '{name}' (pretrained: {known}); "
                          "give a path ending in .o4r for a file of your own")
    return path


def hand_designed(name: str, learning_rate: Any, grad_clip: float | None = None,
                  global_clip: float | None = None, **kwargs: Any) -> optax.GradientTransformation:
    """``optax.<name>(learning_rate, **kwargs)``, after an optional global-norm clip
    (``global_clip``) and/or elementwise clip (``grad_clip``, as ``optax.clip``), in that order.

    ``name`` is case-insensitive (``"RMSProp"``); unknown names raise ConfigError.
    """
    key = name.strip().lower()
    if key not in hand_designed_names():
        raise ConfigError(f"unknown optimizer '{name}'; known: {', '.join(list_optimizers())} "
                          "(learned ones as NAME:init, NAME:PATH.o4r or NAME:PRETRAINED)")
    try:
        optimizer = getattr(optax, key)(learning_rate, **kwargs)
    except TypeError as error:
        raise ConfigError(f"bad options for optimizer '{key}': {error}") from None
    transforms = []
    if clip_enabled(global_clip):
        transforms.append(optax.clip_by_global_norm(global_clip))
    if clip_enabled(grad_clip):
        transforms.append(optax.clip(grad_clip))
    if not transforms:
        return optimizer
    return optax.chain(*transforms, optimizer)
