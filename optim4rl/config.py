"""Configs: frozen dataclasses built strictly from TOML presets and command-line overrides.

A preset is a TOML file shipped in ``optim4rl/presets/`` (or any path). Unknown keys and values of the wrong type
are rejected with one line naming the key, so a typo never becomes a silently different run.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from optim4rl.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def list_presets() -> dict[str, str]:
    """Preset name -> its one-line description."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.toml")):
        try:
            presets[path.stem] = tomllib.loads(path.read_text()).get("description", "")
        except tomllib.TOMLDecodeError:
            presets[path.stem] = "(unreadable)"
    return presets


def load_preset(name: str) -> dict[str, Any]:
    """Loads a preset by name (``optim4rl/presets/NAME.toml``) or by path to a TOML file."""
    path = Path(name)
    if not (path.suffix == ".toml" and (path.exists() or path.is_symlink())):
        path = PRESET_DIR / f"{name}.toml"
    if not path.exists():
        known = ", ".join(list_presets()) or "(none)"
        raise ConfigError(f"unknown preset {name!r}; known presets: {known}")
    if path.is_dir():
        raise ConfigError(f"preset {path} is a directory, not a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {path} is not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"preset {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    data["_path"] = str(path)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"agent.num_envs=64"`` -> (["agent", "num_envs"], 64), the value parsed as TOML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return key.strip().split("."), value


def set_path(data: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        data = data.setdefault(k, {})
        if not isinstance(data, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {k!r} is not a section")
    data[keys[-1]] = value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where} needs {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, where) for v, a in zip(args, value))
        return origin(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of {hint.__name__} fields")
        return from_dict(hint, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            if abs(value) > 2**53:
                raise ConfigError(f"{where} is too large: {value}")
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def from_dict(cls: type, data: Mapping[str, Any], where: str | None = None) -> Any:
    """Builds dataclass `cls` from `data`; unknown keys and wrong types raise ConfigError."""
    where = where or cls.__name__
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown config key {where}.{unknown[0]}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints.get(k, Any), f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_numbers(obj: Any) -> None:
    """Raises ValueError naming the first float field of dataclass `obj` that is NaN or ±inf.

    Called by every config's ``__post_init__``, so the Python API, TOML presets and the command
    line are checked at one place (``x <= 0`` is False for NaN: range checks alone let it pass).
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                continue
            if not math.isfinite(float(v)):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")


def replace(obj: Any, **changes: Any) -> Any:
    """`dataclasses.replace` with the same strict checking as `from_dict`."""
    changes = {k: v for k, v in changes.items() if v is not None}
    current = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}
    current.update(changes)
    return from_dict(type(obj), current)
