"""``make_optimizer``: one string names any optimizer the project can train an agent with.

Spec forms::

    "adam", "rmsprop", "sgd", ...   any optax optimizer (case-insensitive)
    "optim4rl:init"                 a learned architecture with fresh, untrained φ (seed 0)
    "optim4rl:runs/x/opt.o4r"       a learned optimizer from a parameter file
    "optim4rl:grid6"                a shipped pretrained optimizer (optim4rl/pretrained/grid6.o4r)
    "rlc2024:init"                  a named configuration of an architecture (registry.CONFIGURATIONS),
                                    here Optim4RL as in the final (RLC 2024) paper version

The learned names are ``optim4rl``, ``l2l``, ``lin`` and ``star``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
import pathlib
from typing import Any

import jax
import optax

from optim4rl.errors import ConfigError, ParameterFileError
from optim4rl.optimizers.base import LearnedOptimizer, MetaParams, clip_enabled
from optim4rl.optimizers.files import load
from optim4rl.optimizers.registry import (CONFIGURATIONS, LEARNED, OPTIONAL_LEARNED, hand_designed,
                                          pretrained_path, resolve_configuration)


def make_optimizer(spec: str, learning_rate: Any, grad_clip: float | None = None,
                   global_clip: float | None = None, **kwargs: Any) -> optax.GradientTransformation:
    """Build the optax transformation named by ``spec`` (forms in the module docstring).

    Args:
      spec: optimizer name, or ``LEARNED_NAME:SOURCE`` for a learned optimizer.
      learning_rate: step size α (float or optax schedule).
      grad_clip: elementwise gradient clip (``None`` or ≤ 0: off). Learned optimizers apply it
        just before their network, hand-designed ones as ``optax.clip``.
      global_clip: global-norm gradient clip (``optax.clip_by_global_norm``), applied first.
      **kwargs: options of the optax constructor (``b1=0.9``), or, with ``NAME:init``, fields of
        the learned architecture (``inputs="raw"``).

    Raises:
      ConfigError: unknown name or options. ParameterFileError: a bad parameter file.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"optimizer spec must be a non-empty string, got {spec!r}")
    check_step_size(learning_rate)
    for what, clip in (("grad_clip", grad_clip), ("global_clip", global_clip)):
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real)
                                 or not math.isfinite(clip)):
            raise ConfigError(f"{what} must be a finite number or None (<= 0: off), got {clip!r}")
    name, has_source, source = spec.strip().partition(":")
    name = name.strip().lower()
    if not has_source and (name in LEARNED or name in CONFIGURATIONS):
        raise ConfigError(f"learned optimizer '{name}' needs meta-parameters: use '{name}:init', "
                          f"'{name}:PATH.o4r' or '{name}:PRETRAINED'")
    if not has_source and name not in OPTIONAL_LEARNED:
        return hand_designed(name, learning_rate, grad_clip=grad_clip, global_clip=global_clip,
                             **kwargs)
    opt, phi, _ = learned_from_spec(spec, **kwargs)
    tx = opt.transform(phi, learning_rate, grad_clip=grad_clip)
    if clip_enabled(global_clip):
        tx = optax.chain(optax.clip_by_global_norm(global_clip), tx)
    return tx


def check_step_size(learning_rate: Any) -> None:
    """A step size is a positive finite number or an optax schedule (a callable of the step)."""
    if callable(learning_rate):
        return
    try:
        value = None if isinstance(learning_rate, (bool, str, bytes)) else float(learning_rate)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value) or not value > 0:
        raise ConfigError(f"learning_rate must be a positive finite number or an optax schedule, "
                          f"got {learning_rate!r}")


@functools.partial(jax.jit, static_argnums=0)
def _init_meta(opt: LearnedOptimizer, key: jax.Array) -> MetaParams:
    # One compiled program, cached per architecture, instead of dozens of small eager ones.
    return opt.init_meta(key)


def learned_from_spec(spec: str, **config: Any) -> tuple[LearnedOptimizer, MetaParams, dict]:
    """``"NAME:SOURCE"`` -> ``(architecture, meta-parameters, info)`` of a learned optimizer.

    ``SOURCE`` is ``init`` (fresh φ from seed 0; ``config`` sets architecture fields), a path to a
    ``.o4r`` file, or the name of a shipped pretrained optimizer.
    """
    name, _, source = spec.strip().partition(":")
    name, source = name.strip().lower(), source.strip()
    arch, fields = resolve_configuration(name)
    if name in CONFIGURATIONS:
        if source == "init":
            return learned_from_spec(f"{arch}:init", **{**fields, **config})
        opt, phi, info = learned_from_spec(f"{arch}:{source}", **config)
        differ = {k: getattr(opt, k) for k, v in fields.items() if _normal(getattr(opt, k)) != _normal(v)}
        if differ:
            raise ParameterFileError(f"'{spec}': the file's {arch} optimizer is not the {name} configuration "
                                     f"(it has {differ}); use '{arch}:{source}'")
        return opt, phi, info
    if name in OPTIONAL_LEARNED:
        raise ConfigError(f"{name}: VeLO needs its pretrained weights, which are not shipped and "
                          "cannot be downloaded here; loading user-supplied VeLO weights is not "
                          "supported in this version")
    if name not in LEARNED:
        raise ConfigError(f"unknown learned optimizer '{name}' in '{spec}'; learned: "
                          f"{', '.join(LEARNED)}")
    if not source:
        raise ConfigError(f"'{spec}': give a source after the colon: init, PATH.o4r or PRETRAINED")
    if source == "init":
        try:
            opt = LEARNED[name](**config)
        except TypeError as error:
            raise ConfigError(f"bad options for {name}: {error}") from None
        except ValueError as error:
            raise ConfigError(f"bad options for {name}: {error}") from None
        phi = _init_meta(opt, jax.random.key(0))
        return opt, phi, {"source": "init", "seed": 0}
    if config:
        raise ConfigError(f"'{spec}': the architecture comes from the file; options "
                          f"{sorted(config)} are only allowed with '{name}:init'")
    path = _source_path(source)
    opt, phi, info = load(path)
    if opt.name != name:
        raise ParameterFileError(f"{path}: holds a '{opt.name}' optimizer, not '{name}' "
                                 f"(use '{opt.name}:{source}')")
    return opt, phi, info


def optimizer_source(spec: str) -> dict[str, Any] | None:
    """Which parameter file a learned-optimizer spec reads, with the file's SHA-256; else None.

    Run directories record this, so a re-run (``compare`` skips finished runs) notices when a
    pretrained or user file was replaced, instead of reusing results of the old parameters.
    """
    name, sep, source = spec.strip().partition(":")
    source = source.strip()
    name = resolve_configuration(name)[0]
    if not sep or name not in LEARNED or source in ("", "init"):
        return None
    path = _source_path(source)
    try:
        digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()
    except OSError as error:
        raise ParameterFileError(f"{path}: cannot read optimizer file ({error.strerror})") from None
    return {"path": str(path), "sha256": digest}


def _normal(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _source_path(source: str) -> str | os.PathLike:
    """A path (ends in .o4r, has a separator, or names an existing file) or a pretrained name."""
    looks_like_path = source.endswith(".o4r") or os.sep in source or "/" in source
    return source if looks_like_path or os.path.isfile(source) else pretrained_path(source)
