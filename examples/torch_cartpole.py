"""PPO on Gymnasium CartPole-v1 in PyTorch, trained with optim4rl's learned optimizer and with Adam.

A CleanRL-style single file: a PPO agent (Schulman et al. 2017) whose only change between the two
runs is the optimizer,

    optim4rl.torch.Optim4RL(agent.parameters(), lr=..., file="optim4rl:grid6")  # φ trained in JAX
    torch.optim.Adam(agent.parameters(), lr=..., eps=1e-5)

The grid6 optimizer was meta-trained in JAX on six gridworlds with A2C (Lan et al., "Learning to
Optimize for Reinforcement Learning", arXiv 2302.01470); CartPole and PPO are unseen tasks for it.
Each optimizer trains ``--seeds`` agents; the script prints, side by side, the mean return of the
last 10% of finished episodes (mean ± sd over seeds) and the wall time.

    pip install "optim4rl[torch]" gymnasium
    python examples/torch_cartpole.py [--total-steps 100000] [--seeds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import optim4rl.torch


@dataclasses.dataclass(frozen=True)
class Args:
    total_steps: int = 100_000
    seeds: int = 3
    num_envs: int = 8
    rollout: int = 128  # steps per env per update
    epochs: int = 4
    minibatches: int = 4
    lr: float = 1e-3  # the same α for both optimizers
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5


def parse_args() -> Args:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(Args):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default)
    return Args(**vars(parser.parse_args()))


def layer(fan_in: int, fan_out: int, std: float = 2 ** 0.5) -> nn.Linear:
    linear = nn.Linear(fan_in, fan_out)
    nn.init.orthogonal_(linear.weight, std)
    nn.init.zeros_(linear.bias)
    return linear


class Agent(nn.Module):
    def __init__(self, obs_size: int, num_actions: int):
        super().__init__()
        self.critic = nn.Sequential(layer(obs_size, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                    layer(64, 1, std=1.0))
        self.actor = nn.Sequential(layer(obs_size, 64), nn.Tanh(), layer(64, 64), nn.Tanh(),
                                   layer(64, num_actions, std=0.01))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def policy(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.actor(obs))


def train(args: Args, optimizer_name: str, seed: int) -> tuple[float, float]:
    """Train one agent; returns (mean return of the last 10% of episodes, wall seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    envs = gym.make_vec("CartPole-v1", num_envs=args.num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    envs = gym.wrappers.vector.RecordEpisodeStatistics(envs)
    agent = Agent(envs.single_observation_space.shape[0], envs.single_action_space.n)
    if optimizer_name == "optim4rl:grid6":
        optimizer = optim4rl.torch.Optim4RL(agent.parameters(), lr=args.lr, file="optim4rl:grid6")
    else:
        optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)

    batch = args.num_envs * args.rollout
    minibatch = batch // args.minibatches
    num_updates = args.total_steps // batch
    obs_buf = torch.zeros(args.rollout, args.num_envs, envs.single_observation_space.shape[0])
    act_buf = torch.zeros(args.rollout, args.num_envs, dtype=torch.long)
    logp_buf, rew_buf, done_buf, val_buf = (torch.zeros(args.rollout, args.num_envs)
                                            for _ in range(4))
    episode_returns = []
    obs, _ = envs.reset(seed=seed)
    obs = torch.as_tensor(obs, dtype=torch.float32)
    for update in range(num_updates):
        # Linear step-size annealing, as in CleanRL; torch LR schedulers work the same way.
        for group in optimizer.param_groups:
            group["lr"] = args.lr * (1.0 - update / num_updates)
        for t in range(args.rollout):
            with torch.no_grad():
                dist = agent.policy(obs)
                action = dist.sample()
                obs_buf[t], act_buf[t], logp_buf[t] = obs, action, dist.log_prob(action)
                val_buf[t] = agent.value(obs)
            obs, reward, terminated, truncated, info = envs.step(action.numpy())
            obs = torch.as_tensor(obs, dtype=torch.float32)
            rew_buf[t] = torch.as_tensor(reward, dtype=torch.float32)
            done_buf[t] = torch.as_tensor(terminated | truncated, dtype=torch.float32)
            if "episode" in info:
                episode_returns.extend(info["episode"]["r"][info["_episode"]].tolist())

        # Generalised advantage estimation (Schulman et al. 2016); a done step does not bootstrap.
        with torch.no_grad():
            next_value = agent.value(obs)
            advantages = torch.zeros_like(rew_buf)
            running = torch.zeros(args.num_envs)
            for t in reversed(range(args.rollout)):
                value_after = next_value if t == args.rollout - 1 else val_buf[t + 1]
                not_done = 1.0 - done_buf[t]
                delta = rew_buf[t] + args.gamma * value_after * not_done - val_buf[t]
                running = delta + args.gamma * args.gae_lambda * not_done * running
                advantages[t] = running
            returns = advantages + val_buf

        flat = [x.reshape(batch, *x.shape[2:]) for x in (obs_buf, act_buf, logp_buf, advantages,
                                                         returns)]
        for _ in range(args.epochs):
            for index in torch.randperm(batch).split(minibatch):
                b_obs, b_act, b_logp, b_adv, b_ret = (x[index] for x in flat)
                b_adv = (b_adv - b_adv.mean()) / (b_adv.std() + 1e-8)
                dist = agent.policy(b_obs)
                ratio = torch.exp(dist.log_prob(b_act) - b_logp)
                policy_loss = -torch.min(ratio * b_adv,
                                         ratio.clamp(1 - args.clip, 1 + args.clip) * b_adv).mean()
                value_loss = 0.5 * (agent.value(b_obs) - b_ret).square().mean()
                loss = (policy_loss + args.value_coef * value_loss
                        - args.entropy_coef * dist.entropy().mean())
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
    envs.close()
    last = episode_returns[-max(1, len(episode_returns) // 10):]
    return float(np.mean(last)), time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # a small network: threads only add overhead
    print(f"PPO on CartPole-v1, {args.total_steps:,} steps per seed, {args.num_envs} envs, "
          f"α = {args.lr} (linearly annealed), {args.seeds} seeds")
    results = {}
    for name in ("optim4rl:grid6", "adam"):
        results[name] = [train(args, name, seed) for seed in range(args.seeds)]
        for seed, (score, seconds) in enumerate(results[name]):
            print(f"  {name:<15} seed {seed}: return {score:6.1f}  ({seconds:5.1f} s)", flush=True)
    print(f"\n{'optimizer':<16}{'return (last 10% of episodes)':>32}{'wall s / seed':>16}")
    for name, runs in results.items():
        scores, seconds = [r[0] for r in runs], [r[1] for r in runs]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(f"{name:<16}{statistics.mean(scores):>22.1f} ± {spread:<7.1f}"
              f"{statistics.mean(seconds):>16.1f}")


if __name__ == "__main__":
    main()
