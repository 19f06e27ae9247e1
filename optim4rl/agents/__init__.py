"""Agents: A2C and PPO (networks, losses, ``make_train``), docs/paper_settings.md §3–§4.

``a2c.make_train(cfg, tx)`` / ``ppo.make_train(cfg, tx)`` return a pure training run
(``train(key)``, ``train.init``, ``train.run_chunk``); see docs/DESIGN.md.
"""

from optim4rl.agents import a2c, distributions, networks, ppo, running_statistics
from optim4rl.agents.a2c import A2CConfig
from optim4rl.agents.networks import make_network, make_ppo_network
from optim4rl.agents.ppo import PPOConfig
from optim4rl.agents.types import Trajectory

__all__ = [
    "a2c",
    "ppo",
    "networks",
    "distributions",
    "running_statistics",
    "A2CConfig",
    "PPOConfig",
    "Trajectory",
    "make_network",
    "make_ppo_network",
]
