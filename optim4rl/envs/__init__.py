"""Environments: gridworlds, Catch, and adapters for Brax and gymnax tasks.

``optim4rl.envs.make(name, **kwargs)`` builds any registered environment; ``list_envs()`` names
them. Brax and gymnax are imported only when one of their tasks is made.
"""

from optim4rl.envs.base import Env, EnvState, TimeStep
from optim4rl.envs.catch import Catch
from optim4rl.envs.gridworld import GRIDWORLDS, Gridworld
from optim4rl.envs.registry import env_family, list_envs, make

__all__ = [
    "Env",
    "EnvState",
    "TimeStep",
    "Catch",
    "Gridworld",
    "GRIDWORLDS",
    "make",
    "list_envs",
    "env_family",
]
