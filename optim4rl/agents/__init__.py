"""Agents: A2C and PPO (networks, losses, ``make_train``), SPEC §3–§4."""

from optim4rl.agents import a2c, networks
from optim4rl.agents.a2c import A2CConfig
from optim4rl.agents.networks import make_network, make_ppo_network

__all__ = ["a2c", "networks", "A2CConfig", "make_network", "make_ppo_network"]
