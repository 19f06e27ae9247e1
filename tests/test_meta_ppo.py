"""MetaPPO: pipeline meta-training with PPO agents on a Brax task (docs/paper_settings.md §2).

A tiny inverted double pendulum (4 envs per agent, 8-unit networks, 2 agents). Compiling a Brax
step dominates: the tests share one trainer, and `MetaTrainer.jitted_chunk` compiles its chunk
once for the meta-step test and every run of the resume test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim4rl import optimizers
from optim4rl.agents import ppo
from optim4rl.meta import MetaConfig, MetaTask, MetaTrainer
from optim4rl.meta import train as meta_train

TASK = "inverted_double_pendulum"


def tiny_ppo_config(**changes) -> MetaConfig:
    ppo_settings = dict(batch_size=4, num_minibatches=2, unroll_length=4, num_updates_per_batch=2,
                        policy_hidden_sizes=[8], value_hidden_sizes=[8])
    ppo_settings.update(changes.pop("ppo", {}))
    base = dict(agent="ppo", tasks=(MetaTask(TASK, 1.0, 3e-4),), num_agents=2, envs_per_agent=4,
                reset_interval=2, inner_updates=1, iterations=2, iterations_per_chunk=1, eval_steps=0,
                optimizer_options={"hidden_size": 4}, ppo=ppo_settings)
    base.update(changes)
    return MetaConfig(**base)


@pytest.fixture(scope="module")
def trainer():
    return MetaTrainer(tiny_ppo_config())


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_config_is_the_tasks_ppo_settings_with_the_overrides():
    cfg = tiny_ppo_config(tasks=(MetaTask(TASK, 2.0, 3e-4),))
    agent = cfg.ppo_config(cfg.tasks[0])
    paper = ppo.PPOConfig.paper(TASK)
    assert agent.num_envs == 4 and agent.batch_size == 4 and agent.num_minibatches == 2
    assert agent.reward_scaling == 2.0 * paper.reward_scaling  # the task's reward scale multiplies PPO's
    assert agent.discounting == paper.discounting and agent.entropy_cost == paper.entropy_cost
    assert cfg.meta_loss == "ppo"  # the default "a2c" names the agent's own loss
    # K + 1 batches of batch_size · num_minibatches sequences of unroll_length steps per agent.
    assert cfg.env_steps_per_iteration() == 2 * 2 * 4 * 2 * 4


def test_one_meta_step_is_finite_and_changes_phi(trainer):
    state = meta_train.place(trainer.init(), trainer)  # laid out as `run` does: one compilation
    phi_before = _leaves(state.phi)
    state, metrics = trainer.jitted_chunk(1)(state)
    metrics = jax.device_get(metrics)
    assert float(metrics["skipped_update"][0]) == 0.0
    assert np.isfinite(metrics["meta_loss"][0]) and metrics[f"meta_grad_norm/{TASK}"][0] > 0
    assert all(np.all(np.isfinite(x)) for x in _leaves(state.phi))
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(phi_before, _leaves(state.phi))) > 0
    # The meta-loss is the PPO loss: its three logged terms add up to it.
    terms = sum(float(metrics[f"meta_loss_{t}/{TASK}"][0]) for t in ("actor", "critic", "entropy"))
    assert float(metrics[f"meta_loss/{TASK}"][0]) == pytest.approx(terms, rel=1e-4, abs=1e-5)
    assert np.isfinite(metrics[f"update_scale/{TASK}"][0]) and metrics[f"update_scale/{TASK}"][0] > 0
    # The agents carry their observation statistics (updated by the K + 1 batches).
    pop = state.populations[0]
    steps = (trainer.cfg.inner_updates + 1) * trainer.tasks[0].agent_config.steps_per_update
    np.testing.assert_allclose(np.asarray(pop.normalizer.count), steps)
    assert np.all(np.asarray(pop.age) >= 0)


def test_ppo_meta_loss_is_the_trainers_loss_on_the_same_batch(trainer):
    from optim4rl.agents import networks, running_statistics

    setup = trainer.tasks[0]
    reference = ppo.make_train(setup.agent_config, optax.adam(1e-3))
    obs_size, = setup.env.observation_shape
    action_size = setup.env.action_size
    rng = np.random.default_rng(0)
    sequences, length = 6, setup.agent_config.unroll_length

    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    truncation = jnp.asarray(rng.random((sequences, length)) < 0.1, jnp.float32)
    termination = jnp.asarray(rng.random((sequences, length)) < 0.1, jnp.float32) * (1 - truncation)
    batch = ppo.PPOBatch(obs=normal(sequences, length, obs_size), raw_action=normal(sequences, length, action_size),
                         reward=normal(sequences, length), termination=termination, truncation=truncation,
                         log_prob=normal(sequences, length) - 3.0, bootstrap_obs=normal(sequences, obs_size))
    params = networks.init_params(setup.network, jax.random.key(1), setup.env.observation_shape)
    normalizer = running_statistics.update(running_statistics.init((obs_size,)), batch.obs)
    key = jax.random.key(2)
    ours, our_aux = trainer.ppo_meta_loss(params, normalizer, batch, key, setup)
    theirs, their_aux = ppo.ppo_loss(params, reference.network, reference.dist, normalizer, batch, key,
                                     reference.cfg)
    assert float(ours) == float(theirs)
    for name in ("policy_loss", "value_loss", "entropy"):
        assert float(our_aux[name]) == float(their_aux[name]), name
    # The trainer's network and settings are the task's PPO agent's.
    assert reference.cfg == setup.agent_config
    for a, b in zip(jax.tree.leaves(params),
                    jax.tree.leaves(networks.init_params(reference.network, jax.random.key(1), (obs_size,)))):
        assert a.shape == b.shape


def _smooth_ppo_loss(params, network, dist, normalizer, batch, key, cfg):
    """A differentiable stand-in for the PPO loss (whose value is not what its semi-gradient
    differentiates: GAE targets and advantages are stop-gradient)."""
    total = 0.0
    for i, leaf in enumerate(jax.tree.leaves(params)):
        coeff = jnp.sin(jnp.arange(leaf.size, dtype=jnp.float32) + i).reshape(leaf.shape)
        total = total + jnp.sum(coeff * leaf) + jnp.sum(jnp.tanh(leaf) ** 2)
    zero = jnp.zeros(())
    return total, {"policy_loss": total, "value_loss": zero, "entropy": zero}


def test_meta_gradient_of_one_update_matches_finite_differences(monkeypatch):
    """One PPO step of one epoch and one minibatch: the optimizer's (stop-gradient) input does not
    depend on φ, so the first-order meta-gradient through the update and the recurrent state is
    exact, and central differences check it."""
    monkeypatch.setattr(ppo, "ppo_loss", _smooth_ppo_loss)
    tr = MetaTrainer(tiny_ppo_config(grad_clip=None, ppo={"num_minibatches": 1, "num_updates_per_batch": 1}))
    state = tr.init()
    setup, pop = tr.tasks[0], state.populations[0]
    keys = jax.random.split(jax.random.key(3), len(setup.offsets))

    def mean_loss(phi):
        losses, _ = jax.vmap(tr.agent_meta_loss, in_axes=(None, 0, 0, None))(phi, pop, keys, setup)
        return jnp.mean(losses)

    value_and_grad = jax.jit(jax.value_and_grad(mean_loss))  # one compilation for both checks
    phi = state.phi
    _, grad = value_and_grad(phi)
    norm = float(optax.global_norm(grad))
    assert norm > 0
    rng = np.random.default_rng(0)
    for direction in (grad, jax.tree.map(lambda g: jnp.asarray(rng.normal(size=g.shape), jnp.float32), grad)):
        direction = jax.tree.map(lambda d: d / optax.global_norm(direction), direction)
        eps = 1e-2
        plus, _ = value_and_grad(jax.tree.map(lambda p, d: p + eps * d, phi, direction))
        minus, _ = value_and_grad(jax.tree.map(lambda p, d: p - eps * d, phi, direction))
        fd = float(plus - minus) / (2 * eps)
        analytic = float(sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))))
        assert fd == pytest.approx(analytic, rel=0.05, abs=1e-3 * norm)


def test_kill_and_resume_reach_the_same_phi(trainer, tmp_path):
    cfg = trainer.cfg
    full = meta_train.run(cfg, tmp_path / "full", trainer=trainer)
    stopped = meta_train.run(cfg, tmp_path / "resumed", stop_after_chunks=1, trainer=trainer)
    assert stopped == {"stopped_at_iteration": 1}
    resumed = meta_train.run(cfg, tmp_path / "resumed", resume=True, trainer=trainer)
    assert resumed["iterations"] == full["iterations"] == 2
    _, phi_full, info = optimizers.load(tmp_path / "full" / "optimizer.o4r")
    _, phi_resumed, _ = optimizers.load(tmp_path / "resumed" / "optimizer.o4r")
    for a, b in zip(jax.tree.leaves(phi_full), jax.tree.leaves(phi_resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert info["trained_on"] == [TASK] and info["env_steps"] == 2 * cfg.env_steps_per_iteration()
