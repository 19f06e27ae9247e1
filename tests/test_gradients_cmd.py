"""Gradient recording (optim4rl.analysis.collect), the digits reference and `optim4rl gradients`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from optim4rl.analysis import collect, gradients

PARAMS = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,)), "c": {"w": jnp.zeros((2, 2, 2))}}


def random_grads(key, n):
    keys = jax.random.split(key, n)
    return [jax.tree.map(lambda p, k=k: jax.random.normal(k, p.shape) * 10.0 ** jax.random.uniform(
        k, (), minval=-6, maxval=0), PARAMS) for k in keys]


def test_recording_captures_the_fed_gradients_and_the_inner_updates():
    inner = optax.chain(optax.clip(0.5), optax.adam(1e-2))
    indices = np.array([0, 5, 11, 12, 16, 17, 24])  # a, b, c and both ends
    tx = collect.recording(inner, indices, every=3, num_snapshots=4)
    grads = random_grads(jax.random.key(0), 11)
    state, inner_state = jax.jit(tx.init)(PARAMS), inner.init(PARAMS)
    update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
    for n, g in enumerate(grads):
        updates, state = update(g, state, PARAMS)
        expected, inner_state = inner_update(g, inner_state, PARAMS)
        np.testing.assert_allclose(ravel_pytree(updates)[0], ravel_pytree(expected)[0], rtol=1e-5)
        if n % 3 == 0:
            np.testing.assert_array_equal(state.grads[n // 3], ravel_pytree(g)[0][indices])
            np.testing.assert_allclose(state.updates[n // 3], ravel_pytree(updates)[0][indices],
                                       rtol=0)
    np.testing.assert_array_equal(state.steps, [0, 3, 6, 9])
    assert int(state.count) == 11
    # Only updates 0, 3, 6, 9 were written, each into its own row.
    np.testing.assert_array_equal(
        state.grads, np.stack([ravel_pytree(grads[n])[0][indices] for n in (0, 3, 6, 9)]))


def test_recording_stops_when_the_buffer_is_full_and_marks_unwritten_rows():
    tx = collect.recording(optax.sgd(1.0), [1, 2], every=1, num_snapshots=3)
    state = tx.init(PARAMS)
    grads = random_grads(jax.random.key(1), 5)
    for g in grads[:2]:
        _, state = tx.update(g, state)
    np.testing.assert_array_equal(state.steps, [0, 1, -1])
    record = collect.record_from_state(state, np.zeros(2, np.int32), ["a"])
    assert record.grads.shape == (2, 2) and record.updates.shape == (2, 2)
    np.testing.assert_allclose(record.updates, -record.grads)  # sgd(1): update = -g
    for g in grads[2:]:
        _, state = tx.update(g, state)
    np.testing.assert_array_equal(state.steps, [0, 1, 2])
    np.testing.assert_array_equal(state.grads[2], ravel_pytree(grads[2])[0][np.array([1, 2])])
    with pytest.raises(ValueError, match="outside"):
        collect.recording(optax.sgd(1.0), [25], 1, 1).init(PARAMS)
    with pytest.raises(ValueError, match="sorted"):
        collect.recording(optax.sgd(1.0), [3, 1], 1, 1)


def test_recording_under_jit_and_vmap_keeps_each_seed_apart():
    indices = np.array([2, 7, 20])
    tx = collect.recording(optax.adam(1e-3), indices, every=2, num_snapshots=2)
    seeds = 3
    params = jax.tree.map(lambda p: jnp.stack([p] * seeds), PARAMS)
    per_seed = [random_grads(jax.random.key(10 + s), 4) for s in range(seeds)]
    state = jax.jit(jax.vmap(tx.init))(params)
    update = jax.jit(jax.vmap(tx.update))
    for n in range(4):
        g = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_seed[s][n] for s in range(seeds)])
        _, state = update(g, state, params)
    assert state.grads.shape == (seeds, 2, 3)
    for s in range(seeds):
        expected = np.stack([ravel_pytree(per_seed[s][n])[0][indices] for n in (0, 2)])
        np.testing.assert_array_equal(state.grads[s], expected)
    np.testing.assert_array_equal(state.steps, [[0, 2]] * seeds)
    # The train state holds it somewhere inside: find_recording_state digs it out.
    found = collect.find_recording_state({"opt_state": state, "other": jnp.ones(2)})
    assert found.grads.shape == (seeds, 2, 3)


def test_select_coordinates_is_stratified_sorted_and_complete():
    params = {"big": jnp.zeros((100, 50)), "bias": jnp.zeros((3,)), "mid": jnp.zeros((40,))}
    indices, layer_ids, names = collect.select_coordinates(params, 200, seed=0)
    assert names == ("bias", "big", "mid") and indices.size == 200  # jax.tree_util leaf order
    assert np.all(np.diff(indices) > 0) and indices[-1] < 5043
    counts = np.bincount(layer_ids, minlength=3)
    assert counts[0] == 3 and counts[2] >= 32 and counts.sum() == 200  # small layers all present
    flat_ids = np.concatenate([np.full(3, 0), np.full(5000, 1), np.full(40, 2)])
    np.testing.assert_array_equal(flat_ids[indices], layer_ids)
    everything, ids, _ = collect.select_coordinates(params, 10_000)
    np.testing.assert_array_equal(everything, np.arange(5043))
    assert collect.plan_snapshots(782, 150) == (6, 131)


def test_zero_free_windows_and_too_few_snapshots():
    g = np.arange(1, 10 * 3 + 1, dtype=np.float32).reshape(10, 3)  # [snapshot, coord]
    g[1, 0] = 0.0  # spoils coord 0's first window
    windows = collect.zero_free_windows(g, seq_len=5)
    assert windows.shape == (5, 5)  # 3 coords x 2 windows, one dropped
    np.testing.assert_array_equal(windows[:, 0], g[5:, 0])
    np.testing.assert_array_equal(windows[:, 1], g[:5, 1])
    record = gradients.GradientRecord(grads=g[:2], steps=[0, 1], layer_ids=[0, 0, 0], layer_names=["w"])
    with pytest.raises(ValueError, match="cannot be split into 3"):
        collect.analyze({"tiny": record}, "unused-dir")


def test_recording_inside_a2c_sees_the_agents_gradient():
    from optim4rl import make_optimizer
    from optim4rl.agents import a2c

    cfg = a2c.A2CConfig(env="catch", num_envs=4, total_steps=160, updates_per_chunk=2)
    plain = a2c.make_train(cfg, make_optimizer("adam", 1e-3, grad_clip=1.0))
    shapes = jax.eval_shape(plain.init, jax.random.key(0)).params
    indices, _, _ = collect.select_coordinates(shapes, 300)
    train = a2c.make_train(cfg, collect.recording(plain.tx, indices, every=1, num_snapshots=2))
    # update_with_grads returns the gradient it fed to the (recording) optimizer.
    state, _, grads = jax.jit(train.update_with_grads)(train.init(jax.random.key(0)))
    recorded = collect.find_recording_state(state)
    np.testing.assert_array_equal(recorded.grads[0], ravel_pytree(grads)[0][indices])
    np.testing.assert_array_equal(recorded.steps, [0, -1])


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory):
    from optim4rl.cli import main

    root = tmp_path_factory.mktemp("gradients")
    rl, sl = root / "catch", root / "digits"
    # Catch CPU preset: 64 envs x 20 steps = 1280 env steps per update -> 5 updates.
    assert main(["gradients", "--env", "catch", "--agent", "a2c", "--optimizer", "adam",
                 "--steps", "6400", "--coords", "600", "--out", str(rl)]) == 0
    assert main(["gradients", "--supervised", "digits", "--steps", "40", "--snapshots", "8",
                 "--coords", "300", "--out", str(sl)]) == 0
    return rl, sl


def test_gradients_command_writes_a_loadable_record(recorded_runs):
    rl, _ = recorded_runs
    record = gradients.load_gradient_record(rl / "gradients.npz")
    assert record.grads.shape == (5, 600) and record.updates.shape == (5, 600)
    np.testing.assert_array_equal(record.steps, np.arange(5))
    assert np.all(np.isfinite(record.grads)) and np.any(record.grads != 0)
    assert record.metadata["agent"] == "a2c" and record.metadata["env"] == "catch"
    assert record.metadata["total_env_steps"] == 6400
    assert set(record.layer_names) >= {"params/policy_head/kernel", "params/value_head/bias"}
    assert set(np.unique(record.layer_ids)) == set(range(len(record.layer_names)))
    summary = json.loads((rl / "summary.json").read_text())
    drift = summary["records"]["A2C catch"]["drift"]
    assert set(drift) == {"early-middle", "early-late", "middle-late"}
    assert drift["early-late"]["wasserstein"] >= 0
    for name in ("gradient_histograms.png", "gradient_drift.png", "learning_curve.png",
                 "metrics.csv", "config.json", "report.md"):
        assert (rl / name).is_file(), name


def test_supervised_digits_and_the_comparison(recorded_runs, tmp_path, capsys):
    from optim4rl.cli import main

    rl, sl = recorded_runs
    record = gradients.load_gradient_record(sl / "gradients.npz")
    assert record.grads.shape == (8, 300)
    assert record.metadata["kind"] == "supervised" and record.metadata["model"] == "MLP 64-32-10"
    assert 0.0 <= record.metadata["test_accuracy"] <= 1.0
    assert len(record.layer_names) == 4  # two Dense layers, kernel + bias each
    out = tmp_path / "compare"
    assert main(["gradients", "--compare", str(rl), str(sl / "gradients.npz"), "--no-identity",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["records"]) == {"A2C catch", "MLP digits"}
    assert (out / "gradient_histograms.png").is_file() and (out / "gradient_drift.png").is_file()
    assert "Drift between training phases" in capsys.readouterr().out


def test_gradients_command_rejects_bad_input(capsys):
    from optim4rl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["gradients", "--env", "catch", "--supervised", "digits"])
    assert exit_info.value.code == 2
    assert "exactly one of" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["gradients", "--compare", "/nonexistent/run.npz"])
    assert exit_info.value.code == 2
