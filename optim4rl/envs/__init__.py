"""Environments: gridworlds, Catch, and adapters for Brax and gymnax tasks.

``optim4rl.envs.make(name, **kwargs)`` builds any registered environment.
"""

from optim4rl.envs.base import Env, EnvState, TimeStep
from optim4rl.envs.registry import list_envs, make

__all__ = ["Env", "EnvState", "TimeStep", "make", "list_envs"]
