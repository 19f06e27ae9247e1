"""Configuration of pipeline meta-training (docs/paper_settings.md §2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from optim4rl.config import check_numbers
from optim4rl.errors import ConfigError


@dataclass(frozen=True)
class MetaTask:
    """One meta-training task: an environment with its own reward scale and agent step size."""

    env: str
    reward_scale: float = 1.0
    learning_rate: float = 3e-3
    reset_interval: int | None = None  # None: MetaConfig.reset_interval
    num_agents: int | None = None  # None: MetaConfig.num_agents

    def __post_init__(self):
        try:
            check_numbers(self)
        except ValueError as exc:
            raise ConfigError(f"meta: {exc}") from None
        if not self.learning_rate > 0:
            raise ConfigError(f"task {self.env}: learning_rate must be positive, got {self.learning_rate}")
        if self.reward_scale == 0:
            raise ConfigError(f"task {self.env}: reward_scale must not be 0")
        for name in ("reset_interval", "num_agents"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"task {self.env}: {name} must be at least 1, got {value}")


@dataclass(frozen=True)
class MetaConfig:
    """Pipeline training of a learned optimizer over a population of A2C or PPO agents.

    Every task keeps `num_agents` agents (own parameters, optimizer state, `envs_per_agent` envs)
    sharing the meta-parameters φ. Agent j is re-initialised at meta-iteration t when
    ``t % reset_interval == int(linspace(0, reset_interval - 1, num_agents)[j])`` (pipeline), so the
    population always mixes early, middle and late training. One meta-iteration = `inner_updates`
    updates with the learned optimizer, each on a fresh rollout, then the meta-loss on one more
    rollout; the meta-gradient flows through the updates and the optimizer's recurrent states.

    ``agent = "ppo"`` (MetaPPO, docs/paper_settings.md §2): one inner update is one PPO training
    step (a fresh batch of ``batch_size · num_minibatches`` sequences of ``unroll_length`` steps
    from the agent's ``envs_per_agent`` Brax environments, then ``num_updates_per_batch`` epochs ×
    ``num_minibatches`` steps of U_φ) and the meta-loss is the PPO loss on one more batch. The PPO
    settings are the task's (``PPOConfig.paper``) overridden by the ``ppo`` table; ``reward_scale``
    multiplies the task's PPO ``reward_scaling``; ``rollout_length`` is A2C's only.
    """

    optimizer: str = "optim4rl"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    # Start φ from this parameter file or pretrained name (e.g. from `optim4rl imitate`) instead
    # of a random init; the file fixes the architecture (not in the paper, which starts from scratch).
    init_from: str | None = None
    tasks: tuple[MetaTask, ...] = (MetaTask("catch", 1.0, 3e-3),)
    agent: Literal["a2c", "ppo"] = "a2c"
    # agent "ppo": PPOConfig fields over the task's PPO settings (num_envs is envs_per_agent).
    ppo: Mapping[str, Any] = field(default_factory=dict)
    num_agents: int = 512
    envs_per_agent: int = 1
    inner_updates: int = 4
    rollout_length: int = 20
    reset_interval: int = 144
    pipeline: bool = True
    iterations: int = 585
    # The agent's own loss ("a2c" is the default's name: for agent "ppo" it means the PPO loss,
    # recorded as "ppo"), or its policy term alone ("actor").
    meta_loss: Literal["a2c", "ppo", "actor"] = "a2c"
    grad_clip: float | None = 1.0  # elementwise clip of agent gradients before the optimizer
    meta_learning_rate: float = 1e-3
    # Meta-gradient processing before Adam on φ, three independent choices applied in this order
    # (each off when None or 0; TOML has no null, so presets write 0):
    #   meta_max_norm     per task, the agents' mean meta-gradient is rescaled to this global norm
    #                     (normalised, not clipped), then the tasks are averaged. The paper's
    #                     six-gridworld run (0.5); the authors' final code does not use it on
    #                     big_dense_long or Catch.
    #   meta_grad_clip    elementwise clip of the averaged meta-gradient (final code: 1.0, one of
    #                     the two settings of its big_dense_long sweep).
    #   meta_global_clip  clip_by_global_norm of the averaged meta-gradient (final code: 0.5, the
    #                     other setting).
    meta_max_norm: float | None = 0.5
    # "task": the mean of the agents' meta-gradients (docs/paper_settings.md §2). "agent": each agent's meta-gradient
    # is first scaled to unit norm, so agents of every age weigh the same (not in the paper).
    meta_normalize: Literal["task", "agent"] = "task"
    meta_grad_clip: float | None = None
    meta_global_clip: float | None = None
    iterations_per_chunk: int = 10
    # Rematerialisation of the K inner updates in the meta-gradient's backward pass:
    #   "full"  keep only each update's carry and recompute the whole update (rollout, agent
    #           gradient, optimizer forward pass) in the backward pass: least memory;
    #   "none"  keep what the backward pass needs of each update (the optimizer's inputs, or its
    #           activations where it runs unblocked) and recompute nothing;
    #   "auto"  "none" where MetaTrainer's estimate of that memory fits in REMAT_MEMORY_FRACTION
    #           of the device's memory, else "full" (the choice is in the run's config.json).
    # true / false (the earlier boolean) mean "full" / "none".
    remat: Literal["auto", "full", "none"] | bool = "auto"
    checkpoint_every_s: float = 180.0
    eval_every: int = 0  # meta-iterations between evaluations of φ (0: only at the end)
    eval_steps: int = 200_000  # env steps of the fresh agent trained in an evaluation
    eval_num_envs: int | None = None  # None: the task's A2C default
    age_bins: int = 4
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        if not self.tasks:
            raise ConfigError("meta-training needs at least one task")
        for name in ("num_agents", "envs_per_agent", "inner_updates", "rollout_length",
                     "reset_interval", "iterations", "iterations_per_chunk", "age_bins"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        try:
            check_numbers(self)
        except ValueError as exc:
            raise ConfigError(f"meta: {exc}") from None
        if not self.meta_learning_rate > 0:
            raise ConfigError(f"meta_learning_rate must be positive, got {self.meta_learning_rate}")
        for name in ("grad_clip", "meta_max_norm", "meta_grad_clip", "meta_global_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 or none: off), got {value}")
        for name in ("eval_every", "eval_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.eval_num_envs is not None and self.eval_num_envs < 1:
            raise ConfigError(f"eval_num_envs must be at least 1, got {self.eval_num_envs}")
        if not self.checkpoint_every_s > 0:
            raise ConfigError(f"checkpoint_every_s must be positive, got {self.checkpoint_every_s}")
        if not 0 <= self.seed <= 2**31 - 1:
            raise ConfigError(f"seed must be between 0 and 2**31 - 1, got {self.seed}")
        if self.agent == "a2c":
            if self.ppo:
                raise ConfigError(f"ppo settings ({', '.join(self.ppo)}) need agent = \"ppo\"")
            if self.meta_loss == "ppo":
                raise ConfigError('meta_loss "ppo" needs agent = "ppo" (A2C\'s loss is "a2c")')
        else:
            if self.meta_loss == "a2c":
                object.__setattr__(self, "meta_loss", "ppo")
            fixed = sorted(set(self.ppo) & _PPO_FIXED.keys())
            if fixed:
                raise ConfigError(f"ppo.{fixed[0]} is set by meta-training ({_PPO_FIXED[fixed[0]]})")
            for task in self.tasks:  # every PPO setting is checked here, before any side effect
                self.ppo_config(task)
                if self.eval_steps:
                    self.ppo_eval_config(task)

    def ppo_config(self, task: MetaTask):
        """The PPOConfig of one task's agents (agent "ppo")."""
        from optim4rl import config as config_lib
        from optim4rl.agents import ppo

        settings = dataclasses.asdict(ppo.PPOConfig.paper(task.env))
        settings.update(num_envs=self.envs_per_agent, **self.ppo)
        settings["reward_scaling"] = settings["reward_scaling"] * task.reward_scale
        return config_lib.from_dict(ppo.PPOConfig, settings, "meta.ppo")

    def task_reset_interval(self, task: MetaTask) -> int:
        return task.reset_interval or self.reset_interval

    def task_num_agents(self, task: MetaTask) -> int:
        return task.num_agents or self.num_agents

    def ppo_eval_config(self, task: MetaTask):
        """The PPO run that evaluates φ on `task`: its meta-training settings for `eval_steps`
        steps in one chunk (one evaluation, at the end), on `eval_num_envs` envs when given."""
        agent_cfg = self.ppo_config(task)
        changes = {"total_steps": max(self.eval_steps, 1), "eval_every": 0,
                   "num_eval_envs": max(agent_cfg.num_eval_envs, 1)}
        if self.eval_num_envs:
            changes["num_envs"] = self.eval_num_envs
        try:
            agent_cfg = dataclasses.replace(agent_cfg, **changes)
        except ConfigError as exc:
            raise ConfigError(f"the evaluation's PPO run (eval_steps, eval_num_envs): {exc}") from None
        num_updates = -(-agent_cfg.total_steps // agent_cfg.steps_per_update)
        return agent_cfg.replace(updates_per_chunk=num_updates)

    def env_steps_per_iteration(self) -> int:
        def per_agent(task):
            if self.agent == "ppo":
                return (self.inner_updates + 1) * self.ppo_config(task).steps_per_update
            return self.envs_per_agent * (self.inner_updates + 1) * self.rollout_length

        return sum(self.task_num_agents(t) * per_agent(t) for t in self.tasks)


# PPOConfig fields that meta-training sets itself: the ppo table must not.
_PPO_FIXED = {"env": "the task's env", "num_envs": "envs_per_agent", "total_steps": "iterations",
              "updates_per_chunk": "iterations_per_chunk", "eval_every": "eval_every"}
