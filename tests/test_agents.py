"""Agents: networks (docs/paper_settings.md §3), A2C and PPO losses against references, the make_train contract
(determinism, seeds under vmap, chunks == one scan) and learning checks (docs/paper_settings.md §4)."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim4rl import envs
from optim4rl.agents import a2c, networks, ppo, running_statistics
from optim4rl.agents.distributions import Categorical, NormalTanh
from optim4rl.agents.types import Trajectory, mean_episode_return
from optim4rl.errors import ConfigError

# Chunked and one-scan runs are the same computation compiled in two contexts, so they agree up
# to float rounding, which RL's feedback loop amplifies over many updates: compare early updates.
FLOAT_METRICS_RTOL = 1e-4


def _param_shapes(params):
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _assert_metrics_close(chunked, full):
    assert chunked.keys() == full.keys()
    for name in full:
        updates = chunked[name].shape[1]
        np.testing.assert_allclose(chunked[name], full[name][:, :updates], rtol=FLOAT_METRICS_RTOL, atol=1e-5,
                                   equal_nan=True, err_msg=name)


def _run_chunks(train, keys, num_chunks=None):
    state = jax.jit(jax.vmap(train.init))(keys)
    run_chunk = jax.jit(jax.vmap(train.run_chunk))
    chunks = []
    for _ in range(num_chunks or train.num_chunks):
        state, metrics = run_chunk(state)
        chunks.append(jax.device_get(metrics))
    return {k: np.concatenate([c[k] for c in chunks], axis=1) for k in chunks[0]}


# --- networks ---------------------------------------------------------------------------------


def _shapes_of(net, observation_shape):
    """Parameter shapes, by abstract evaluation (no compilation)."""
    params = jax.eval_shape(lambda key: networks.init_params(net, key, observation_shape), jax.random.key(0))
    return params, _param_shapes(params)


def test_networks_follow_spec_section_3():
    catch = envs.make("catch")
    net = networks.make_network(catch)
    params, shapes = _shapes_of(net, catch.observation_shape)
    assert shapes["params/torso_layers_0/kernel"] == (50, 256)
    assert shapes["params/policy_head/kernel"] == (256, 3)
    assert shapes["params/value_head/kernel"] == (256, 1)
    logits, value = jax.eval_shape(net.apply, params, jnp.zeros((7, 4) + catch.observation_shape))
    assert logits.shape == (7, 4, 3) and value.shape == (7, 4)

    small = envs.make("small_dense_long")
    _, shapes = _shapes_of(networks.make_network(small), small.observation_shape)
    assert shapes["params/torso_layers_0/kernel"] == (int(np.prod(small.observation_shape)), 32)
    assert len(shapes) == 6  # one hidden layer, two heads

    big = envs.make("big_dense_long")
    net = networks.make_network(big)
    channels, rows, cols = big.observation_shape
    params, shapes = _shapes_of(net, big.observation_shape)
    assert shapes["params/conv/kernel"] == (2, 2, channels, 16)  # planes moved to channels-last
    assert shapes["params/torso_layers_0/kernel"] == (rows * cols * 16, 32)  # SAME padding
    logits, value = jax.eval_shape(net.apply, params, jnp.zeros((3,) + big.observation_shape))
    assert logits.shape == (3, 9) and value.shape == (3,)

    continuous = SimpleNamespace(name="ant", discrete=False, action_size=8, num_actions=8, observation_shape=(27,))
    net = networks.make_network(continuous)
    _, shapes = _shapes_of(net, (27,))
    policy = [shapes[f"params/policy_mlp/hidden_{i}/kernel"] for i in range(5)]
    value = [shapes[f"params/value_mlp/hidden_{i}/kernel"] for i in range(6)]
    assert policy == [(27, 32), (32, 32), (32, 32), (32, 32), (32, 16)]  # 4x32, loc + scale
    assert value == [(27, 256)] + [(256, 256)] * 4 + [(256, 1)]  # 5x256
    assert net.activation == "swish"


# --- losses against references -------------------------------------------------------------------


def _numpy_lambda_returns(rewards, discounts, next_values, lam):
    returns = np.zeros_like(rewards)
    acc = next_values[-1]
    for t in reversed(range(len(rewards))):
        acc = rewards[t] + discounts[t] * ((1 - lam) * next_values[t] + lam * acc)
        returns[t] = acc
    return returns


@pytest.mark.parametrize("kernel", [(2, 2), (3, 3), (2, 3), (1, 1)])
def test_patch_conv_equals_flax_conv(kernel):
    """The big-gridworld torso's conv is written as patches x matmul (fast inside scans on CPU);
    it must have nn.Conv's parameters and initialisation and compute the same function."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(1), (3, 15, 11, 5))
    ref, ours = nn.Conv(16, kernel), networks.PatchConv(16, kernel)
    params = ref.init(jax.random.key(0), x)
    own = ours.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, own) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(own["params"]["kernel"], params["params"]["kernel"])
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    grad_ref = jax.grad(lambda p: jnp.sum(jnp.sin(ref.apply(p, x))))(params)
    grad_own = jax.grad(lambda p: jnp.sum(jnp.sin(ours.apply(p, x))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grad_own, grad_ref)


def test_orthogonal_init_equals_flax_and_runs_no_batched_qr_under_vmap():
    # jaxlib's batched CPU QR blocks XLA pool threads on each other (a deadlock with two at once);
    # networks.orthogonal must give flax's values with one-matrix QRs only.
    import flax.linen as nn

    keys = jax.random.split(jax.random.key(3), 4)
    for shape in [(64, 64), (4, 64), (64, 2)]:
        ours = jax.jit(jax.vmap(lambda k: networks.orthogonal(1.4)(k, shape)))
        flax_init = jax.jit(jax.vmap(lambda k: nn.initializers.orthogonal(1.4)(k, shape)))
        np.testing.assert_array_equal(np.asarray(ours(keys)), np.asarray(flax_init(keys)))
        qr_calls = [line for line in ours.lower(keys).as_text().splitlines() if "geqrf" in line]
        assert qr_calls and all('num_batch_dims = "0"' in line for line in qr_calls), qr_calls


def test_td_lambda_returns_match_numpy():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(6, 3)).astype(np.float32)
    discounts = (0.9 * (rng.random((6, 3)) > 0.3)).astype(np.float32)
    next_values = rng.normal(size=(6, 3)).astype(np.float32)
    got = a2c.td_lambda_returns(jnp.asarray(rewards), jnp.asarray(discounts), jnp.asarray(next_values), 0.8)
    np.testing.assert_allclose(got, _numpy_lambda_returns(rewards, discounts, next_values, 0.8), rtol=1e-5)


def test_a2c_loss_on_a_hand_made_trajectory_matches_numpy():
    env = envs.make("catch")
    net = networks.make_network(env)
    params = networks.init_params(net, jax.random.key(1), env.observation_shape)
    rng = np.random.default_rng(1)
    T, N = 4, 2
    obs = rng.integers(0, 2, size=(T, N) + env.observation_shape).astype(np.float32)
    last_obs = rng.integers(0, 2, size=(N,) + env.observation_shape).astype(np.float32)
    action = np.array([[0, 2], [1, 1], [2, 0], [1, 2]], np.int32)
    reward = np.array([[0, 0], [1, 0], [0, -1], [0, 0]], np.float32)
    done = np.array([[0, 0], [1, 0], [0, 1], [0, 0]], np.float32)
    traj = Trajectory(jnp.asarray(obs), jnp.asarray(action), jnp.asarray(reward), jnp.asarray(done),
                      jnp.zeros((T, N)), jnp.zeros((T, N)))
    cfg = a2c.A2CConfig(reward_scale=10.0)
    loss, aux = jax.jit(a2c.a2c_loss, static_argnums=(1, 4))(params, net, traj, jnp.asarray(last_obs), cfg)

    outputs = jax.jit(net.apply)(params, np.concatenate([obs, last_obs[None]]))
    logits, values = (np.asarray(x, np.float64) for x in outputs)
    returns = _numpy_lambda_returns(10.0 * reward, 0.995 * (1 - done), values[1:], 0.95)
    td = returns - values[:-1]
    log_pi = logits[:-1] - np.log(np.exp(logits[:-1]).sum(-1, keepdims=True))
    log_pi_a = np.take_along_axis(log_pi, action[..., None], -1)[..., 0]
    entropy = -(np.exp(log_pi) * log_pi).sum(-1).mean()
    actor = -(log_pi_a * td).mean()
    critic = (td**2).mean()
    np.testing.assert_allclose(aux["value_loss"], critic, rtol=1e-5)
    np.testing.assert_allclose(aux["actor_loss"], actor, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux["entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(loss, actor + 0.5 * critic - 0.01 * entropy, rtol=1e-4)

    # The advantage is a constant for the actor and the TD target a constant for the critic:
    # the value head's gradient is exactly that of 0.5 * mean (sg(G) - V)^2.
    grads, _ = jax.jit(a2c.a2c_grad, static_argnums=(1, 4))(params, net, traj, jnp.asarray(last_obs), cfg)

    def critic_only(p):
        _, v = net.apply(p, jnp.asarray(obs))
        return 0.5 * jnp.mean(jnp.square(jnp.asarray(returns, jnp.float32) - v))

    expected = jax.jit(jax.grad(critic_only))(params)["params"]["value_head"]["kernel"]
    np.testing.assert_allclose(grads["params"]["value_head"]["kernel"], expected, rtol=1e-4, atol=1e-6)


def test_compute_gae_matches_brax():
    from brax.training.agents.ppo.losses import compute_gae as brax_gae

    rng = np.random.default_rng(2)
    T, B = 7, 5
    truncation = (rng.random((T, B)) < 0.15).astype(np.float32)
    termination = ((rng.random((T, B)) < 0.15) * (1 - truncation)).astype(np.float32)
    args = dict(truncation=jnp.asarray(truncation), termination=jnp.asarray(termination),
                rewards=jnp.asarray(rng.normal(size=(T, B)), jnp.float32),
                values=jnp.asarray(rng.normal(size=(T, B)), jnp.float32),
                bootstrap_value=jnp.asarray(rng.normal(size=(B,)), jnp.float32), lambda_=0.95, discount=0.97)
    for ours, theirs in zip(ppo.compute_gae(**args), brax_gae(**args)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_ppo_loss_matches_brax():
    """Our PPO loss on a hand-made minibatch equals Brax's compute_ppo_loss with the same weights."""
    from brax.training import types as brax_types
    from brax.training.acme import running_statistics as brax_statistics
    from brax.training.acme import specs
    from brax.training.agents.ppo import losses as brax_losses
    from brax.training.agents.ppo import networks as brax_networks

    B, T, obs_size, action_size = 4, 5, 6, 2
    env = SimpleNamespace(name="toy", discrete=False, action_size=action_size, num_actions=action_size,
                          observation_shape=(obs_size,))
    net = networks.make_ppo_network(env)
    params = networks.init_params(net, jax.random.key(5), (obs_size,))
    rng = np.random.default_rng(5)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    obs = f32(rng.normal(2.0, 3.0, size=(B, T, obs_size)))
    next_obs = f32(rng.normal(2.0, 3.0, size=(B, T, obs_size)))
    raw_action = f32(rng.normal(size=(B, T, action_size)))
    reward = f32(rng.normal(size=(B, T)))
    truncation = f32(rng.random((B, T)) < 0.1)
    done = jnp.maximum(truncation, f32(rng.random((B, T)) < 0.2))
    log_prob = f32(rng.normal(-2.0, 0.3, size=(B, T)))
    key = jax.random.key(6)

    ours_stats = running_statistics.update(running_statistics.init((obs_size,)), obs)
    brax_stats = brax_statistics.update(
        brax_statistics.init_state(specs.Array((obs_size,), jnp.dtype("float32"))), obs)
    np.testing.assert_allclose(ours_stats.std, brax_stats.std, rtol=1e-5)

    cfg = ppo.PPOConfig()  # docs/paper_settings.md §4: clip 0.3, value weight 0.25, entropy 1e-2, reward scale 10
    batch = ppo.PPOBatch(obs, raw_action, reward, done * (1 - truncation), truncation, log_prob, next_obs[:, -1])
    loss, aux = jax.jit(ppo.ppo_loss, static_argnums=(1, 2, 6))(params, net, NormalTanh(action_size), ours_stats,
                                                                   batch, key, cfg)

    brax_net = brax_networks.make_ppo_networks(obs_size, action_size,
                                               preprocess_observations_fn=brax_statistics.normalize)
    brax_params = brax_losses.PPONetworkParams(policy={"params": params["params"]["policy_mlp"]},
                                               value={"params": params["params"]["value_mlp"]})
    data = brax_types.Transition(
        observation=obs, action=jnp.tanh(raw_action), reward=reward, discount=1 - done, next_observation=next_obs,
        extras={"state_extras": {"truncation": truncation},
                "policy_extras": {"raw_action": raw_action, "log_prob": log_prob,
                                  "distribution_params": f32(rng.normal(size=(B, T, 2 * action_size)))}})
    brax_loss, brax_aux = jax.jit(
        lambda p, s, d, k: brax_losses.compute_ppo_loss(
            p, s, d, k, brax_net, entropy_cost=cfg.entropy_cost, discounting=cfg.discounting,
            reward_scaling=cfg.reward_scaling, gae_lambda=cfg.gae_lambda, clipping_epsilon=cfg.clipping_epsilon,
            normalize_advantage=True, vf_coefficient=2 * cfg.value_loss_coef))(brax_params, brax_stats, data, key)
    np.testing.assert_allclose(aux["policy_loss"], brax_aux["policy_loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(aux["value_loss"], brax_aux["v_loss"], rtol=1e-4)
    np.testing.assert_allclose(-cfg.entropy_cost * aux["entropy"], brax_aux["entropy_loss"], rtol=1e-4)
    np.testing.assert_allclose(loss, brax_loss, rtol=1e-4)


def test_distributions_match_brax_and_categorical():
    from brax.training.distribution import NormalTanhDistribution

    key = jax.random.key(3)
    params = jax.random.normal(key, (5, 6)) * 2.0
    ours, theirs = NormalTanh(3), NormalTanhDistribution(3)
    raw = ours.sample(jax.random.key(4), params)
    np.testing.assert_allclose(ours.log_prob(params, raw), theirs.log_prob(params, raw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.entropy(params, key), theirs.entropy(params, key), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.postprocess(ours.mode(params)), theirs.mode(params), rtol=1e-6)

    logits = jnp.log(jnp.array([[0.2, 0.3, 0.5]]))
    cat = Categorical(3)
    np.testing.assert_allclose(cat.log_prob(logits, jnp.array([2])), np.log([0.5]), rtol=1e-6)
    np.testing.assert_allclose(cat.entropy(logits), [-(0.2 * np.log(0.2) + 0.3 * np.log(0.3) + 0.5 * np.log(0.5))],
                               rtol=1e-6)


def test_running_statistics_match_numpy():
    rng = np.random.default_rng(4)
    a, b = rng.normal(3.0, 2.0, size=(4, 5, 3)), rng.normal(-1.0, 0.5, size=(6, 3))
    stats = running_statistics.update(running_statistics.update(running_statistics.init((3,)), a), b)
    everything = np.concatenate([a.reshape(-1, 3), b])
    assert int(stats.count) == 26
    np.testing.assert_allclose(stats.mean, everything.mean(0), rtol=1e-5)
    np.testing.assert_allclose(stats.std, everything.std(0), rtol=1e-4)
    np.testing.assert_allclose(running_statistics.normalize(b, stats), (b - everything.mean(0)) / everything.std(0),
                               rtol=1e-4, atol=1e-5)


def test_episode_return_metric_carries_forward_and_starts_nan():
    nan = jnp.float32(jnp.nan)
    assert np.isnan(mean_episode_return(jnp.zeros((3, 2)), jnp.ones((3, 2)), nan))
    done = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    returns = jnp.array([[9.0, 2.0], [4.0, 9.0]])
    assert float(mean_episode_return(done, returns, nan)) == 3.0
    assert float(mean_episode_return(jnp.zeros((2, 2)), returns, jnp.float32(3.0))) == 3.0


def test_configs_validate_and_presets_follow_spec():
    with pytest.raises(ConfigError, match="num_envs"):
        a2c.A2CConfig(num_envs=0)
    with pytest.raises(ConfigError, match="multiple of num_envs"):
        ppo.PPOConfig(num_envs=3, batch_size=4, num_minibatches=1)
    assert a2c.A2CConfig.paper("big_dense_long").num_envs == 512
    assert a2c.A2CConfig.paper("catch").total_steps == 500_000
    hash(a2c.A2CConfig(env_kwargs={"rows": 10}))
    walker = ppo.PPOConfig.paper("walker2d")
    assert (walker.num_envs, walker.batch_size, walker.num_minibatches, walker.unroll_length,
            walker.num_updates_per_batch, walker.discounting, walker.reward_scaling) == (
        2048, 512, 32, 20, 8, 0.997, 5.0)
    cpu = ppo.PPOConfig.cpu("ant")
    assert cpu.unroll_length == 5 and cpu.num_minibatches == 32 and cpu.num_envs == 128
    assert (cpu.batch_size * cpu.num_minibatches) % cpu.num_envs == 0
    # reacher is not in docs/paper_settings.md §4's table: Brax's published settings, 4 physics steps per action.
    reacher = ppo.PPOConfig.paper("reacher")
    assert (reacher.unroll_length, reacher.num_updates_per_batch, reacher.discounting,
            reacher.entropy_cost, reacher.reward_scaling, dict(reacher.env_kwargs)) == (
        50, 8, 0.95, 1e-3, 5.0, {"action_repeat": 4})
    reacher_cpu = ppo.PPOConfig.cpu("reacher")
    assert reacher_cpu.steps_per_update == 128 * 4 * 50 and dict(reacher_cpu.env_kwargs) == {"action_repeat": 4}
    assert ppo.PAPER_LEARNING_RATES["reacher"] == 3e-4
    train = a2c.make_train(a2c.A2CConfig(total_steps=10_000, updates_per_chunk=3), optax.adam(1e-3))
    assert train.steps_per_update == 64 * 20
    assert train.num_updates == 9 and train.num_chunks == 3  # 8 updates, rounded up to whole chunks
    assert train.total_steps >= 10_000


# --- A2C: contract and learning -----------------------------------------------------------------

A2C_SEEDS = 3


@pytest.fixture(scope="module")
def a2c_catch():
    """A2C + Adam on Catch (the paper: 64 envs), 3 seeds vmapped, the whole run twice."""
    cfg = a2c.A2CConfig(env="catch", total_steps=60_000, updates_per_chunk=16)
    train = a2c.make_train(cfg, optax.adam(1e-2))
    keys = jax.random.split(jax.random.key(0), A2C_SEEDS)
    run = jax.jit(jax.vmap(train))
    first = jax.device_get(run(keys)[1])
    second = jax.device_get(run(keys)[1])
    return SimpleNamespace(train=train, keys=keys, metrics=first, again=second)


def test_a2c_metrics_shape_and_meaning(a2c_catch):
    m, train = a2c_catch.metrics, a2c_catch.train
    for name in ("env_steps", "episode_return", "loss", "entropy", "value_loss", "grad_norm"):
        assert m[name].shape == (A2C_SEEDS, train.num_updates), name
        assert m[name].dtype == np.float32
    np.testing.assert_array_equal(m["env_steps"][0], train.steps_per_update * np.arange(1, train.num_updates + 1))
    assert np.all(np.isfinite(m["episode_return"]))  # Catch episodes (9 steps) end in every rollout
    assert not np.array_equal(m["loss"][0], m["loss"][1])  # seeds differ under vmap


def test_a2c_same_seed_gives_identical_metrics(a2c_catch):
    for name in a2c_catch.metrics:
        np.testing.assert_array_equal(a2c_catch.metrics[name], a2c_catch.again[name], err_msg=name)


def test_a2c_chunks_concatenate_to_the_one_scan_run(a2c_catch):
    assert a2c_catch.train.num_chunks > 1
    _assert_metrics_close(_run_chunks(a2c_catch.train, a2c_catch.keys, num_chunks=2), a2c_catch.metrics)


@pytest.mark.slow
def test_a2c_with_adam_learns_catch(a2c_catch):
    final = a2c_catch.metrics["episode_return"][:, -5:].mean(axis=1)
    assert np.all(final > 0.8), final


# --- PPO: contract and learning ----------------------------------------------------------------

PPO_SEEDS = 2


@pytest.fixture(scope="module")
def ppo_cartpole():
    """PPO + Adam on gymnax CartPole-v1 (discrete), 2 seeds vmapped, the whole run twice."""
    cfg = ppo.PPOConfig.cpu("CartPole-v1", total_steps=80_000, num_envs=32, batch_size=32, num_minibatches=4,
                            unroll_length=32, updates_per_chunk=2, eval_every=2, num_eval_envs=8)
    train = ppo.make_train(cfg, optax.adam(1e-3))
    keys = jax.random.split(jax.random.key(0), PPO_SEEDS)
    run = jax.jit(jax.vmap(train))
    first = jax.device_get(run(keys)[1])
    second = jax.device_get(run(keys)[1])
    return SimpleNamespace(train=train, keys=keys, metrics=first, again=second)


def test_ppo_metrics_shape_and_eval_schedule(ppo_cartpole):
    m, train = ppo_cartpole.metrics, ppo_cartpole.train
    for name in ("env_steps", "episode_return", "eval_return", "loss", "entropy", "value_loss", "grad_norm"):
        assert m[name].shape == (PPO_SEEDS, train.num_updates), name
    assert train.steps_per_update == 32 * 4 * 32
    evaluated = ~np.isnan(m["eval_return"][0])
    np.testing.assert_array_equal(evaluated, (np.arange(train.num_updates) + 1) % 2 == 0)
    assert np.all(m["eval_return"][:, evaluated] <= 500.0)


def test_ppo_same_seed_gives_identical_metrics(ppo_cartpole):
    for name in ppo_cartpole.metrics:
        np.testing.assert_array_equal(ppo_cartpole.metrics[name], ppo_cartpole.again[name], err_msg=name)


def test_ppo_chunks_concatenate_to_the_one_scan_run(ppo_cartpole):
    assert ppo_cartpole.train.num_chunks > 1
    chunked = _run_chunks(ppo_cartpole.train, ppo_cartpole.keys, num_chunks=3)  # 6 updates, 3 evaluations
    _assert_metrics_close(chunked, ppo_cartpole.metrics)


@pytest.mark.slow
def test_ppo_with_adam_improves_on_cartpole(ppo_cartpole):
    evals = ppo_cartpole.metrics["eval_return"]
    evals = evals[:, ~np.isnan(evals[0])]
    assert np.all(evals[:, -2:].mean(axis=1) > 300.0), evals
    assert np.all(evals[:, -2:].mean(axis=1) > evals[:, 0] + 50.0), evals


def test_ppo_continuous_actions_run():
    """The tanh-Gaussian path on a continuous gymnax task (Pendulum-v1), two updates."""
    cfg = ppo.PPOConfig.cpu("Pendulum-v1", total_steps=2 * 8 * 2 * 4, num_envs=8, batch_size=8, num_minibatches=2,
                            unroll_length=4, num_updates_per_batch=2, updates_per_chunk=2, num_eval_envs=2)
    train = ppo.make_train(cfg, optax.adam(1e-3))
    assert not train.env.discrete
    state, metrics = jax.jit(train)(jax.random.key(0))
    assert metrics["loss"].shape == (2,)
    assert np.all(np.isfinite(metrics["loss"])) and np.isfinite(metrics["eval_return"][-1])
    assert state.normalizer.count == 2 * 8 * 2 * 4
