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

# Named configurations of a learned architecture: NAME -> (architecture, fields). A name here is
# used wherever an architecture is (``rlc2024:init``, ``rlc2024:FILE.o4r``, meta-train
# ``--optimizer rlc2024``); files record the architecture and its fields, never the name.
#   rlc2024: Optim4RL as in the authors' code for the final paper version (RLC 2024): GRU-1 reads
#     the raw g and GRU-2 g², each followed by one linear layer 8 -> 1, ε = 1e-8 inside the square
#     root, no sign flip. At its initialisation (zero biases, zero state) it steps α·sign(g) for
#     small |g|. The seed's default (sign/log inputs, 16-16 heads) stays plain ``optim4rl``.
CONFIGURATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "rlc2024": ("optim4rl", {"inputs": "raw", "head_sizes": (), "eps": 1e-8, "sign_flip": False}),
}


def resolve_configuration(name: str) -> tuple[str, dict[str, Any]]:
    """``"rlc2024"`` -> ``("optim4rl", its fields)``; an architecture name -> ``(name, {})``."""
    key = name.strip().lower()
    if key in CONFIGURATIONS:
        arch, fields = CONFIGURATIONS[key]
        return arch, dict(fields)
    return key, {}

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
    return [*hand_designed_names(), *LEARNED, *CONFIGURATIONS, *OPTIONAL_LEARNED]


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
