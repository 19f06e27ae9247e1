"""Every environment optim4rl knows, by name.

``make(name, **kwargs)`` builds one; ``list_envs()`` names them all; ``env_family(name)`` says
which kind it is ("catch", "gridworld", "brax", "gymnax"). Brax and gymnax are imported only
when one of their tasks is made (importing Brax alone takes seconds). Besides the listed names,
``"brax:TASK"`` and ``"gymnax:ID"`` reach any task those libraries register.

Keyword arguments:
- catch: ``rows``, ``columns``;
- gridworlds: any :class:`~optim4rl.envs.gridworld.Gridworld` field (``max_steps``,
  ``respawn_on_free_cell``, ``objects``, ``layout``);
- brax: ``backend``, ``episode_length``, ``action_repeat``, and the Brax task's own
  constructor options;
- gymnax: any field of the task's gymnax ``EnvParams`` (e.g. ``max_steps_in_episode``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from optim4rl.envs.base import Env
from optim4rl.errors import ConfigError
from optim4rl.envs.catch import Catch
from optim4rl.envs.gridworld import GRIDWORLDS, Gridworld, make_gridworld

# Static name lists, so that listing names imports neither Brax nor gymnax.
BRAX_TASKS = (
    "ant",
    "halfcheetah",
    "hopper",
    "humanoid",
    "humanoidstandup",
    "inverted_pendulum",
    "inverted_double_pendulum",
    "pusher",
    "reacher",
    "swimmer",
    "walker2d",
)
GYMNAX_TASKS = (
    "CartPole-v1",
    "Acrobot-v1",
    "MountainCar-v0",
    "Pendulum-v1",
    "MountainCarContinuous-v0",
    "Asterix-MinAtar",
    "Breakout-MinAtar",
    "Freeway-MinAtar",
    "Seaquest-MinAtar",
    "SpaceInvaders-MinAtar",
)


def _check_fields(name: str, cls, kwargs: dict, exclude: tuple[str, ...] = ()) -> None:
    allowed = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"unknown option {key!r} for env {name!r}; allowed: {', '.join(allowed)}")


def _make_catch(name: str, **kwargs) -> Env:
    _check_fields(name, Catch, kwargs, exclude=("name", "discrete"))
    return Catch(**kwargs)


def _make_gridworld(name: str, **kwargs) -> Env:
    _check_fields(name, Gridworld, kwargs, exclude=("name", "discrete"))
    return make_gridworld(name, **kwargs)


def _make_brax(name: str, **kwargs) -> Env:
    from optim4rl.envs.brax_env import make_brax

    return make_brax(name.removeprefix("brax:"), **kwargs)


def _make_gymnax(name: str, **kwargs) -> Env:
    from optim4rl.envs.gymnax_env import make_gymnax

    return make_gymnax(name.removeprefix("gymnax:"), **kwargs)


_FAMILIES: dict[str, tuple[tuple[str, ...], Callable[..., Env]]] = {
    "catch": (("catch",), _make_catch),
    "gridworld": (tuple(GRIDWORLDS), _make_gridworld),
    "brax": (BRAX_TASKS, _make_brax),
    "gymnax": (GYMNAX_TASKS, _make_gymnax),
}
_PREFIXES = {"brax:": "brax", "gymnax:": "gymnax"}


def list_envs(family: str | None = None) -> list[str]:
    """All registered names (of one family if given), in registration order."""
    if family is not None and family not in _FAMILIES:
        raise ConfigError(f"unknown env family {family!r}; known: {', '.join(_FAMILIES)}")
    return [n for f, (names, _) in _FAMILIES.items() if family in (None, f) for n in names]


def env_family(name: str) -> str:
    """"catch", "gridworld", "brax" or "gymnax"."""
    for prefix, family in _PREFIXES.items():
        if name.startswith(prefix):
            return family
    for family, (names, _) in _FAMILIES.items():
        if name in names:
            return family
    raise ConfigError(f"unknown env {name!r}; known envs: {', '.join(list_envs())}")


def make(name: str, **kwargs) -> Env:
    """Build the environment ``name``; see the module docstring for the keyword arguments."""
    if not isinstance(name, str):
        raise ConfigError(f"env name must be a string, got {name!r}")
    family = env_family(name)
    try:
        return _FAMILIES[family][1](name, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"env {name!r}: {error}") from None
