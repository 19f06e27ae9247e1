"""Proximal policy optimisation, following Brax's PPO (``brax/training/agents/ppo``, Brax 0.14).

One update ("training step" in Brax):

1. collect ``batch_size · num_minibatches`` sequences of ``unroll_length`` steps: ``num_envs``
   environments run ``batch_size · num_minibatches / num_envs`` unrolls one after another;
2. update the running observation statistics with the collected observations;
3. ``num_updates_per_batch`` epochs: shuffle the sequences, split them into ``num_minibatches``
   minibatches of ``batch_size``, one optimizer step per minibatch on :func:`ppo_loss`.

The loss (docs/paper_settings.md §4): GAE (λ 0.95) with Brax's truncation handling (a step cut by the time limit
contributes no advantage and no value error), advantage normalisation, clipped surrogate
(ε 0.3), value loss ``value_loss_coef · mean (V − V_target)²`` (0.25, Brax's ``0.5 · 0.5``), and
an entropy bonus. Rewards are multiplied by ``reward_scaling`` in the loss. Continuous actions use
Brax's tanh-squashed Gaussian, discrete actions a categorical policy (gymnax, MinAtar). Gradient
clipping belongs to the optimizer (``make_optimizer(..., grad_clip=1.0)``); any optax
transformation works.

Evaluation runs ``num_eval_envs`` episodes of ``env.max_episode_steps`` steps with the
deterministic policy (the mode of the action distribution) after every ``eval_every`` updates.
Meta-training (MetaPPO, :mod:`optim4rl.meta.pipeline`) reuses :meth:`PPOTrain.collect`,
:meth:`PPOTrain.observe`, :meth:`PPOTrain.sgd` (with the learned optimizer) and :func:`ppo_loss`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from optim4rl.agents import running_statistics
from optim4rl.agents.distributions import make_distribution
from optim4rl.agents.networks import init_params, make_ppo_network
from optim4rl.agents.types import Metrics, Trainer, mean_episode_return, plan_updates
from optim4rl.config import check_numbers
from optim4rl.errors import ConfigError

Array = jax.Array

__all__ = [
    "PAPER_LEARNING_RATES",
    "PPOBatch",
    "PPOConfig",
    "PPOState",
    "PPOTrain",
    "PPOTransition",
    "compute_gae",
    "make_train",
    "ppo_loss",
    "ppo_rollout",
]

# docs/paper_settings.md §4 table: the Adam/RMSProp step size of each paper task (the optimizer is built outside);
# reacher's is Brax's published one.
PAPER_LEARNING_RATES = {"ant": 3e-4, "humanoid": 3e-4, "inverted_double_pendulum": 3e-4, "walker2d": 3e-5,
                        "reacher": 3e-4}

# docs/paper_settings.md §4 per-task PPO settings.
_PAPER = {
    "ant": dict(total_steps=100_000_000, num_envs=4096, batch_size=2048, num_minibatches=32, unroll_length=5,
                num_updates_per_batch=4, entropy_cost=1e-2, discounting=0.97, reward_scaling=10.0),
    "humanoid": dict(total_steps=100_000_000, num_envs=2048, batch_size=1024, num_minibatches=32, unroll_length=10,
                     num_updates_per_batch=8, entropy_cost=1e-3, discounting=0.97, reward_scaling=0.1),
    "inverted_double_pendulum": dict(total_steps=20_000_000, num_envs=2048, batch_size=1024, num_minibatches=32,
                                     unroll_length=5, num_updates_per_batch=4, entropy_cost=1e-2,
                                     discounting=0.97, reward_scaling=10.0),
    "walker2d": dict(total_steps=50_000_000, num_envs=2048, batch_size=512, num_minibatches=32, unroll_length=20,
                     num_updates_per_batch=8, entropy_cost=1e-3, discounting=0.997, reward_scaling=5.0),
}
# Tasks outside docs/paper_settings.md §4's table with published Brax PPO settings (Brax's training notebook).
_BRAX_PUBLISHED = {
    "reacher": dict(total_steps=50_000_000, num_envs=2048, batch_size=256, num_minibatches=32, unroll_length=50,
                    num_updates_per_batch=8, entropy_cost=1e-3, discounting=0.95, reward_scaling=5.0,
                    env_kwargs=(("action_repeat", 4),)),
}
# Other tasks: Brax-like settings for continuous control, PureJaxRL-like
# settings (more steps per sequence, fewer minibatches) for discrete gymnax tasks.
_CONTINUOUS_DEFAULT = _PAPER["ant"]
_DISCRETE_DEFAULT = dict(total_steps=5_000_000, num_envs=256, batch_size=256, num_minibatches=4, unroll_length=32,
                         num_updates_per_batch=4, entropy_cost=1e-2, discounting=0.99, reward_scaling=0.1)
_PAPER_NUM_EVALS = 20
_CPU_NUM_ENVS = 128


# CPU presets keep an update near 20-25k env steps (about 10 updates per 200k-step run).
_CPU_OVERRIDES = {"reacher": dict(num_minibatches=4),  # 128 envs x 4 x 50 = 25,600 steps per update
                  "humanoid": dict(num_minibatches=16),  # 128 x 16 x 10 = 20,480
                  "walker2d": dict(num_minibatches=8)}  # 128 x 8 x 20 = 20,480


def _task_settings(env: str) -> dict:
    """The task's PPO settings: docs/paper_settings.md §4's table, else Brax's published ones, else a family default."""
    task = _task_name(env)
    settings = _PAPER.get(task) or _BRAX_PUBLISHED.get(task)
    return dict(settings or (_DISCRETE_DEFAULT if _is_discrete_task(env) else _CONTINUOUS_DEFAULT))


def _task_name(env: str) -> str:
    return env.split(":", 1)[1] if env.startswith(("brax:", "gymnax:")) else env


def _is_discrete_task(env: str) -> bool:
    from optim4rl.envs.registry import env_family

    try:
        family = env_family(env)
    except ValueError:
        return False
    if family == "gymnax":
        return _task_name(env) not in ("Pendulum-v1", "MountainCarContinuous-v0")
    return family in ("catch", "gridworld")


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (names as in ``brax.training.agents.ppo.train``). Hashable.

    Defaults are the paper's inverted-double-pendulum settings; :meth:`paper` and :meth:`cpu`
    give per-task presets. ``eval_every`` (updates between evaluations) 0 means once per chunk,
    at its end; ``num_eval_envs`` 0 disables evaluation. Empty network sizes / activation mean
    the network default for the task (:func:`optim4rl.agents.networks.make_ppo_network`).
    """

    env: str = "inverted_double_pendulum"
    env_kwargs: tuple = ()
    total_steps: int = 20_000_000
    num_envs: int = 2048
    batch_size: int = 1024
    num_minibatches: int = 32
    unroll_length: int = 5
    num_updates_per_batch: int = 4
    entropy_cost: float = 1e-2
    discounting: float = 0.97
    reward_scaling: float = 10.0
    gae_lambda: float = 0.95
    clipping_epsilon: float = 0.3
    value_loss_coef: float = 0.25
    normalize_advantage: bool = True
    normalize_observations: bool = True
    num_eval_envs: int = 128
    eval_every: int = 0
    deterministic_eval: bool = True
    updates_per_chunk: int = 3
    policy_hidden_sizes: tuple[int, ...] = ()
    value_hidden_sizes: tuple[int, ...] = ()
    activation: str = ""

    def __post_init__(self):
        if isinstance(self.env_kwargs, dict):
            object.__setattr__(self, "env_kwargs", tuple(sorted(self.env_kwargs.items())))
        if isinstance(self.total_steps, float) and self.total_steps.is_integer():
            object.__setattr__(self, "total_steps", int(self.total_steps))
        try:
            check_numbers(self)
        except ValueError as exc:
            raise ConfigError(f"PPOConfig.{exc}") from None
        positive = ("total_steps", "num_envs", "batch_size", "num_minibatches", "unroll_length",
                    "num_updates_per_batch", "updates_per_chunk")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"PPOConfig.{name} must be a positive integer, got {value!r}")
        for name in ("num_eval_envs", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if (self.batch_size * self.num_minibatches) % self.num_envs:
            raise ConfigError(
                f"PPOConfig: batch_size * num_minibatches ({self.batch_size * self.num_minibatches}) "
                f"must be a multiple of num_envs ({self.num_envs})"
            )
        if self.eval_every and self.updates_per_chunk % self.eval_every:
            raise ConfigError(
                f"PPOConfig: updates_per_chunk ({self.updates_per_chunk}) must be a multiple of "
                f"eval_every ({self.eval_every})"
            )
        for name in ("discounting", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"PPOConfig.{name} must lie in [0, 1], got {getattr(self, name)!r}")

    @property
    def steps_per_update(self) -> int:
        return self.batch_size * self.num_minibatches * self.unroll_length

    @classmethod
    def paper(cls, env: str = "inverted_double_pendulum", **overrides) -> "PPOConfig":
        """docs/paper_settings.md §4's settings for ``env`` (GPU budgets): 20 evaluations on 128 envs."""
        base = _task_settings(env)
        base.update(num_eval_envs=128)
        return cls(env=env, **_with_chunking({**base, **overrides}, _PAPER_NUM_EVALS, overrides))

    @classmethod
    def cpu(cls, env: str = "inverted_double_pendulum", **overrides) -> "PPOConfig":
        """The paper's structure (unroll, epochs, minibatches, costs, γ, reward scale) with
        ``num_envs`` 128, ``batch_size`` ≤ 128, 2e6 steps (1e6 for discrete tasks), 10 evaluations
        on 16 envs: a few CPU minutes per seed."""
        base = _task_settings(env)
        base.update(_CPU_OVERRIDES.get(_task_name(env), {}))
        num_envs = min(_CPU_NUM_ENVS, base["num_envs"])
        # Keep sequences per update a multiple of num_envs.
        batch_size = min(base["batch_size"], num_envs)
        num_minibatches = base["num_minibatches"]
        while (batch_size * num_minibatches) % num_envs:
            batch_size *= 2
        total = 1_000_000 if _is_discrete_task(env) else 2_000_000
        base.update(num_envs=num_envs, batch_size=batch_size, total_steps=total, num_eval_envs=16)
        return cls(env=env, **_with_chunking({**base, **overrides}, 10, overrides))

    def replace(self, **changes) -> "PPOConfig":
        return dataclasses.replace(self, **changes)


def _with_chunking(settings: dict, num_evals: int, overrides: dict) -> dict:
    """Unless given explicitly: one evaluation per chunk, ``num_evals`` chunks over the budget."""
    if "updates_per_chunk" in overrides:
        return settings
    steps_per_update = settings["batch_size"] * settings["num_minibatches"] * settings["unroll_length"]
    num_updates = max(1, math.ceil(int(settings["total_steps"]) / steps_per_update))
    per_chunk = max(1, math.ceil(num_updates / num_evals))
    eval_every = int(overrides.get("eval_every", 0))
    if eval_every:  # keep chunks a whole number of evaluation periods
        per_chunk = math.ceil(per_chunk / eval_every) * eval_every
    return {**settings, "updates_per_chunk": per_chunk, "eval_every": eval_every}


# --- data ---------------------------------------------------------------------------------------


class PPOTransition(NamedTuple):
    """One rollout, time-major ``[T, num_envs, ...]``.

    ``raw_action`` is the action before the distribution's post-processing (pre-tanh for the
    tanh-Gaussian); ``log_prob`` its log-probability under the behaviour policy. ``termination``
    is 1 where the episode terminated (not merely hit its time limit), ``truncation`` where it
    hit the time limit.
    """

    obs: Array
    raw_action: Array
    reward: Array
    termination: Array
    truncation: Array
    log_prob: Array
    done: Array
    episode_return: Array


class PPOBatch(NamedTuple):
    """Sequences for the loss, batch-major ``[B, T, ...]``, with the observation after each
    sequence (``bootstrap_obs``, ``[B, ...]``) to bootstrap its value from."""

    obs: Array
    raw_action: Array
    reward: Array
    termination: Array
    truncation: Array
    log_prob: Array
    bootstrap_obs: Array


def _normalizer_fn(cfg):
    if cfg.normalize_observations:
        return running_statistics.normalize
    return lambda obs, stats: obs


def ppo_rollout(key, network, dist, params, normalizer, env, env_state, obs, length: int, normalize=True):
    """Runs the stochastic policy for ``length`` steps in a batch of environments.

    Returns ``(env_state, obs, transition)`` with ``obs`` the observation after the last step
    (the bootstrap observation) and ``transition`` a :class:`PPOTransition` ``[length, num_envs]``.
    """
    params = jax.lax.stop_gradient(params)
    num_envs = obs.shape[0]

    def step(carry, step_key):
        env_state, obs = carry
        action_key, env_key = jax.random.split(step_key)
        net_obs = running_statistics.normalize(obs, normalizer) if normalize else obs
        policy_out = network.apply(params, net_obs, method="policy")
        raw_action = dist.sample(action_key, policy_out)
        log_prob = dist.log_prob(policy_out, raw_action)
        env_state, ts = jax.vmap(env.step)(
            jax.random.split(env_key, num_envs), env_state, dist.postprocess(raw_action)
        )
        termination = ts.done * (1.0 - ts.truncated)
        record = PPOTransition(obs, raw_action, ts.reward, termination, ts.truncated, log_prob, ts.done,
                               ts.episode_return)
        return (env_state, ts.obs), record

    (env_state, obs), data = jax.lax.scan(step, (env_state, obs), jax.random.split(key, length))
    return env_state, obs, data


def compute_gae(truncation, termination, rewards, values, bootstrap_value, lambda_: float, discount: float):
    """Generalised advantage estimation with Brax's truncation handling (time-major ``[T, B]``).

    Returns ``(value_targets, advantages)``, both gradient-stopped. A step cut by the time limit
    gets zero advantage and its value target equals its own value (its successor is the next
    episode's first observation, so there is nothing sound to bootstrap from).
    """
    truncation_mask = 1.0 - truncation
    next_values = jnp.concatenate([values[1:], bootstrap_value[None]], axis=0)
    deltas = (rewards + discount * (1.0 - termination) * next_values - values) * truncation_mask

    def backward(acc, xs):
        mask, delta, term = xs
        acc = delta + discount * (1.0 - term) * mask * lambda_ * acc
        return acc, acc

    _, vs_minus_v = jax.lax.scan(
        backward, jnp.zeros_like(bootstrap_value), (truncation_mask, deltas, termination), reverse=True
    )
    vs = vs_minus_v + values
    next_vs = jnp.concatenate([vs[1:], bootstrap_value[None]], axis=0)
    advantages = (rewards + discount * (1.0 - termination) * next_vs - values) * truncation_mask
    return jax.lax.stop_gradient(vs), jax.lax.stop_gradient(advantages)


def ppo_loss(params, network, dist, normalizer, batch: PPOBatch, key: Array, cfg) -> tuple[Array, dict]:
    """The PPO loss of one minibatch (``batch`` is ``[B, T, ...]``); returns ``(loss, aux)``.

    ``cfg`` needs ``reward_scaling``, ``gae_lambda``, ``discounting``, ``clipping_epsilon``,
    ``normalize_advantage``, ``normalize_observations``, ``value_loss_coef``, ``entropy_cost``.
    ``key`` draws the sample for the tanh-Gaussian's entropy estimate.
    """
    normalize = _normalizer_fn(cfg)
    # Time-major, like Brax (so that the entropy estimate draws the same samples).
    t_major = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    obs = normalize(t_major(batch.obs), normalizer)
    bootstrap_obs = normalize(batch.bootstrap_obs, normalizer)
    policy_out = network.apply(params, obs, method="policy")
    all_values = network.apply(params, jnp.concatenate([obs, bootstrap_obs[None]], axis=0), method="value")
    values = all_values[:-1]
    vs, advantages = compute_gae(
        truncation=t_major(batch.truncation),
        termination=t_major(batch.termination),
        rewards=t_major(batch.reward) * cfg.reward_scaling,
        values=values,
        bootstrap_value=all_values[-1],
        lambda_=cfg.gae_lambda,
        discount=cfg.discounting,
    )
    if cfg.normalize_advantage:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_prob = dist.log_prob(policy_out, t_major(batch.raw_action))
    ratio = jnp.exp(log_prob - t_major(batch.log_prob))
    clipped = jnp.clip(ratio, 1.0 - cfg.clipping_epsilon, 1.0 + cfg.clipping_epsilon)
    policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped * advantages))
    value_loss = cfg.value_loss_coef * jnp.mean(jnp.square(vs - values))
    entropy = jnp.mean(dist.entropy(policy_out, key))
    loss = policy_loss + value_loss - cfg.entropy_cost * entropy
    return loss, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy}


# --- the training loop --------------------------------------------------------------------------


@flax.struct.dataclass
class PPOState:
    """Everything one seed's run carries between updates."""

    params: Any
    opt_state: Any
    normalizer: running_statistics.RunningStatistics
    env_state: Any
    obs: Array
    key: Array
    update_step: Array  # int32
    last_return: Array  # float32, NaN before the first training episode ends


class PPOTrain(Trainer):
    """``make_train``'s result for PPO; see :class:`optim4rl.agents.types.Trainer`.

    ``metrics`` per update: ``env_steps``, ``episode_return`` (training episodes),
    ``eval_return`` (NaN except after an evaluation), ``loss``, ``policy_loss``, ``value_loss``,
    ``entropy``, ``grad_norm`` (means over the update's minibatch steps).
    """

    def __init__(self, cfg: PPOConfig, tx: optax.GradientTransformation, env=None, network=None):
        if env is None:
            from optim4rl import envs

            env = envs.make(cfg.env, **dict(cfg.env_kwargs))
        self.cfg, self.tx, self.env = cfg, tx, env
        self.dist = make_distribution(env)
        self.network = network if network is not None else make_ppo_network(
            env, cfg.policy_hidden_sizes or None, cfg.value_hidden_sizes or None, cfg.activation or None
        )
        self.steps_per_update = cfg.steps_per_update
        self.num_updates, self.updates_per_chunk, self.num_chunks = plan_updates(
            cfg.total_steps, self.steps_per_update, cfg.updates_per_chunk
        )
        self.eval_every = cfg.eval_every or self.updates_per_chunk
        if self.updates_per_chunk % self.eval_every:
            raise ConfigError(
                f"PPO: updates_per_chunk ({self.updates_per_chunk}) must be a multiple of eval_every "
                f"({self.eval_every})"
            )
        self.num_unrolls = cfg.batch_size * cfg.num_minibatches // cfg.num_envs

    def init(self, key: Array) -> PPOState:
        key, net_key, env_key = jax.random.split(key, 3)
        params = init_params(self.network, net_key, self.env.observation_shape)
        env_state, obs = jax.vmap(self.env.reset)(jax.random.split(env_key, self.cfg.num_envs))
        return PPOState(
            params=params,
            opt_state=self.tx.init(params),
            normalizer=running_statistics.init(self.env.observation_shape),
            env_state=env_state,
            obs=obs,
            key=key,
            update_step=jnp.zeros((), jnp.int32),
            last_return=jnp.full((), jnp.nan, jnp.float32),
        )

    # -- one update -------------------------------------------------------------------------

    def collect(self, key: Array, params, normalizer, env_state, obs):
        """``num_unrolls`` unrolls of ``unroll_length`` steps; returns (env_state, obs, batch, data).

        ``data`` is the :class:`PPOTransition` ``[num_unrolls, unroll_length, num_envs]``.
        """
        cfg = self.cfg

        def unroll(carry, unroll_key):
            env_state, obs = carry
            env_state, next_obs, data = ppo_rollout(
                unroll_key, self.network, self.dist, params, normalizer, self.env, env_state, obs,
                cfg.unroll_length, cfg.normalize_observations,
            )
            return (env_state, next_obs), (data, next_obs)

        (env_state, obs), (data, bootstrap_obs) = jax.lax.scan(
            unroll, (env_state, obs), jax.random.split(key, self.num_unrolls)
        )
        # [unrolls, T, envs, ...] -> [unrolls * envs, T, ...]
        to_batch = lambda x: jnp.swapaxes(x, 1, 2).reshape((-1, cfg.unroll_length) + x.shape[3:])
        batch = PPOBatch(
            obs=to_batch(data.obs),
            raw_action=to_batch(data.raw_action),
            reward=to_batch(data.reward),
            termination=to_batch(data.termination),
            truncation=to_batch(data.truncation),
            log_prob=to_batch(data.log_prob),
            bootstrap_obs=bootstrap_obs.reshape((-1,) + bootstrap_obs.shape[2:]),
        )
        return env_state, obs, batch, data

    def observe(self, normalizer, batch: PPOBatch):
        """The running observation statistics updated with a collected batch (when enabled)."""
        if not self.cfg.normalize_observations:
            return normalizer
        return running_statistics.update(normalizer, batch.obs)

    def sgd(self, key: Array, params, opt_state, normalizer, batch: PPOBatch, tx=None, remat: bool = False):
        """``num_updates_per_batch`` epochs of minibatch steps; returns (params, opt_state, metrics).

        ``tx`` replaces the trainer's optimizer (meta-training passes U_φ). The gradient is taken
        at stop-gradient parameters, so it is a constant input of the optimizer for
        differentiation through the updates (docs/paper_settings.md §1; an identity in training).
        ``remat`` recomputes each minibatch step and each epoch in the backward pass, so that
        differentiating through the updates stores only their carries (parameters and optimizer
        state), about ``epochs + minibatches`` of them instead of every step's activations.
        """
        cfg = self.cfg
        tx = self.tx if tx is None else tx
        loss_and_grad = jax.value_and_grad(ppo_loss, has_aux=True)

        def minibatch_step(carry, xs):
            params, opt_state = carry
            minibatch, loss_key = xs
            (loss, aux), grads = loss_and_grad(jax.lax.stop_gradient(params), self.network, self.dist, normalizer,
                                               minibatch, loss_key, cfg)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state), {"loss": loss, **aux, "grad_norm": optax.global_norm(grads)}

        if remat:
            minibatch_step = jax.checkpoint(minibatch_step)

        def epoch(carry, epoch_key):
            perm_key, loss_key = jax.random.split(epoch_key)
            perm = jax.random.permutation(perm_key, cfg.batch_size * cfg.num_minibatches)
            shuffled = jax.tree.map(
                lambda x: x[perm].reshape((cfg.num_minibatches, cfg.batch_size) + x.shape[1:]), batch
            )
            return jax.lax.scan(minibatch_step, carry, (shuffled, jax.random.split(loss_key, cfg.num_minibatches)))

        if remat:
            epoch = jax.checkpoint(epoch)

        (params, opt_state), metrics = jax.lax.scan(
            epoch, (params, opt_state), jax.random.split(key, cfg.num_updates_per_batch)
        )
        return params, opt_state, jax.tree.map(jnp.mean, metrics)

    def update(self, state: PPOState) -> tuple[PPOState, Metrics]:
        key, collect_key, sgd_key = jax.random.split(state.key, 3)
        env_state, obs, batch, data = self.collect(collect_key, state.params, state.normalizer, state.env_state,
                                                   state.obs)
        # Brax updates the statistics before the gradient steps (the rollout used the old ones).
        normalizer = self.observe(state.normalizer, batch)
        params, opt_state, metrics = self.sgd(sgd_key, state.params, state.opt_state, normalizer, batch)
        update_step = state.update_step + 1
        last_return = mean_episode_return(data.done, data.episode_return, state.last_return)
        metrics = {
            "env_steps": (update_step * self.steps_per_update).astype(jnp.float32),
            "episode_return": last_return,
            "eval_return": jnp.full((), jnp.nan, jnp.float32),
            **metrics,
        }
        new_state = PPOState(params, opt_state, normalizer, env_state, obs, key, update_step, last_return)
        return new_state, metrics

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, key: Array, params, normalizer) -> Array:
        """Mean undiscounted return of ``num_eval_envs`` fresh episodes (one per env)."""
        n = self.cfg.num_eval_envs
        normalize = _normalizer_fn(self.cfg)
        reset_key, run_key = jax.random.split(key)
        env_state, obs = jax.vmap(self.env.reset)(jax.random.split(reset_key, n))

        def step(carry, step_key):
            env_state, obs, total, alive = carry
            action_key, env_key = jax.random.split(step_key)
            policy_out = self.network.apply(params, normalize(obs, normalizer), method="policy")
            if self.cfg.deterministic_eval:
                raw_action = self.dist.mode(policy_out)
            else:
                raw_action = self.dist.sample(action_key, policy_out)
            env_state, ts = jax.vmap(self.env.step)(
                jax.random.split(env_key, n), env_state, self.dist.postprocess(raw_action)
            )
            total = total + ts.reward * alive
            alive = alive * (1.0 - ts.done)
            return (env_state, ts.obs, total, alive), None

        init = (env_state, obs, jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32))
        (_, _, total, _), _ = jax.lax.scan(
            step, init, jax.random.split(run_key, self.env.max_episode_steps)
        )
        return jnp.mean(total)

    def run_chunk(self, state: PPOState) -> tuple[PPOState, Metrics]:
        def block(state, _):
            state, metrics = jax.lax.scan(lambda s, _: self.update(s), state, None, length=self.eval_every)
            if self.cfg.num_eval_envs > 0:
                # A key of its own, so that evaluating does not change the training run.
                eval_key = jax.random.fold_in(state.key, 1)
                eval_return = self.evaluate(eval_key, state.params, state.normalizer)
                metrics["eval_return"] = metrics["eval_return"].at[-1].set(eval_return)
            return state, metrics

        state, metrics = jax.lax.scan(block, state, None, length=self.updates_per_chunk // self.eval_every)
        metrics = jax.tree.map(lambda x: x.reshape((self.updates_per_chunk,) + x.shape[2:]), metrics)
        return state, metrics


def make_train(cfg: PPOConfig, tx: optax.GradientTransformation, env=None, network=None) -> PPOTrain:
    """PPO training run for ``cfg`` with optimizer ``tx`` (any optax transformation).

    ``env``/``network`` default to ``optim4rl.envs.make(cfg.env, **cfg.env_kwargs)`` and
    :func:`optim4rl.agents.networks.make_ppo_network`.
    """
    return PPOTrain(cfg, tx, env=env, network=network)
