"""Registry of environments by name (TEMPORARY minimal version; the envs helper extends it)."""

from __future__ import annotations

from optim4rl.envs.base import Env
from optim4rl.envs.catch import Catch

_REGISTRY = {"catch": Catch}


def list_envs() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, **kwargs) -> Env:
    if name not in _REGISTRY:
        raise ValueError(f"unknown env {name!r}; known envs: {', '.join(list_envs())}")
    return _REGISTRY[name](**kwargs)
