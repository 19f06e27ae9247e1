"""The final paper version's configuration (rlc2024) and the meta-gradient processing options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optim4rl import make_optimizer, optimizers
from optim4rl.errors import ParameterFileError
from optim4rl.meta import MetaConfig, MetaTask, MetaTrainer
from optim4rl.optimizers import Optim4RL
from optim4rl.optimizers.make import learned_from_spec


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gru(p, h, x):  # flax GRUCell, gates (r, z, n); h: [N, H], x: [N, in]
    size = h.shape[-1]
    wi, wh, b, bhn = (np.asarray(p[k], np.float64) for k in ("wi", "wh", "b", "bhn"))
    r_, z_, n_ = (slice(i * size, (i + 1) * size) for i in range(3))
    r = _sigmoid(x @ wi[:, r_] + h @ wh[:, r_] + b[r_])
    z = _sigmoid(x @ wi[:, z_] + h @ wh[:, z_] + b[z_])
    n = np.tanh(x @ wi[:, n_] + b[n_] + r * (h @ wh[:, n_] + bhn))
    return (1 - z) * n + z * h


def _linear(p, h):
    return h @ np.asarray(p["dense0"]["w"], np.float64) + np.asarray(p["dense0"]["b"], np.float64)


def test_rlc2024_is_a_named_configuration_of_optim4rl():
    opt, _, info = learned_from_spec("rlc2024:init")
    assert opt == Optim4RL(inputs="raw", head_sizes=(), eps=1e-8, sign_flip=False)
    assert info["source"] == "init"
    assert opt.meta_shapes()["head_m/dense0/w"] == (8, 1) and "head_m/dense1/w" not in opt.meta_shapes()
    assert learned_from_spec("optim4rl:init")[0] == Optim4RL()  # the seed's default stays the default
    assert "rlc2024" in optimizers.list_optimizers()
    # Options still apply on top of the named fields.
    assert learned_from_spec("rlc2024:init", hidden_size=4)[0].hidden_size == 4


def test_rlc2024_update_equals_hand_computed_formulas():
    opt = learned_from_spec("rlc2024:init")[0]
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(opt.init_meta, jax.random.key(0))
    phi = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), shapes)  # biases too
    lr = 3e-3
    params = {"w": jnp.zeros((5, 7)), "b": jnp.zeros((7,))}
    tx = opt.transform(phi, learning_rate=lr)
    state = tx.init(params)
    n = 5 * 7 + 7
    h_m, h_v = np.zeros((n, 8)), np.zeros((n, 8))  # zeros-initialised GRU states
    for _ in range(3):
        grads = {"w": jnp.asarray(rng.normal(0, 0.3, (5, 7)), jnp.float32),
                 "b": jnp.asarray(rng.normal(0, 1e-3, (7,)), jnp.float32)}
        g = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(grads)])
        h_m = _gru(phi["gru_m"], h_m, g[:, None])  # GRU-1 reads the raw g
        h_v = _gru(phi["gru_v"], h_v, (g ** 2)[:, None])  # GRU-2 reads g²
        o1, o2 = _linear(phi["head_m"], h_m)[:, 0], _linear(phi["head_v"], h_v)[:, 0]
        expected = -lr * np.sign(g) * np.exp(o1) / np.sqrt(np.exp(o2) + 1e-8)
        updates, state = tx.update(grads, state, params)
        got = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(updates)])
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-9)


def test_rlc2024_steps_alpha_sign_g_for_small_gradients_at_its_initialisation():
    lr = 3e-3
    g = jnp.asarray([1e-8, -1e-6, 3e-5, -1e-4, 5e-4, -1e-3, 0.0])
    tx = make_optimizer("rlc2024:init", lr)
    updates, _ = tx.update({"x": g}, tx.init({"x": g}), {"x": g})
    ratio = np.asarray(updates["x"]) / (-lr * np.sign(np.asarray(g)) + (np.asarray(g) == 0))
    np.testing.assert_allclose(ratio[:-1], 1.0, atol=1e-3)  # α·sign(g) to three digits
    assert float(updates["x"][-1]) == 0.0  # sign(0) = 0: no step on a zero gradient


def test_rlc2024_file_specs(tmp_path):
    opt, phi, _ = learned_from_spec("rlc2024:init")
    optimizers.save(tmp_path / "r.o4r", opt, phi)
    assert learned_from_spec(f"rlc2024:{tmp_path / 'r.o4r'}")[0] == opt
    assert learned_from_spec(f"optim4rl:{tmp_path / 'r.o4r'}")[0] == opt  # the file records the architecture
    default, phi_default, _ = learned_from_spec("optim4rl:init")
    optimizers.save(tmp_path / "d.o4r", default, phi_default)
    with pytest.raises(ParameterFileError, match="not the rlc2024 configuration"):
        learned_from_spec(f"rlc2024:{tmp_path / 'd.o4r'}")
    from optim4rl.optimizers.make import optimizer_source

    assert optimizer_source(f"rlc2024:{tmp_path / 'r.o4r'}")["sha256"]


def _tiny(**changes) -> MetaConfig:
    base = dict(tasks=(MetaTask("catch", 1.0, 1e-3),), num_agents=4, reset_interval=4, iterations=4,
                inner_updates=2, rollout_length=5, iterations_per_chunk=2, eval_steps=0)
    return MetaConfig(**{**base, **changes})


def test_meta_train_accepts_the_named_configuration():
    trainer = MetaTrainer(_tiny(optimizer="rlc2024"))
    assert trainer.opt == learned_from_spec("rlc2024:init")[0]
    assert MetaTrainer(_tiny(optimizer="rlc2024", optimizer_options={"hidden_size": 4})).opt.hidden_size == 4


def _task_gradient(cfg):
    trainer = MetaTrainer(cfg)
    state = trainer.init()
    setup = trainer.tasks[0]
    grad, _, _, norm, _ = jax.jit(lambda phi, pop, key: trainer.task_meta_gradient(phi, pop, key, setup))(
        state.phi, state.populations[0], jax.random.key(3))
    return trainer, state.phi, grad, float(norm)


def test_per_task_normalisation_rescales_and_off_leaves_the_mean_gradient():
    _, _, raw, raw_norm = _task_gradient(_tiny(optimizer="rlc2024", meta_max_norm=0))
    _, _, normed, norm = _task_gradient(_tiny(optimizer="rlc2024", meta_max_norm=0.5))
    assert norm == pytest.approx(raw_norm, rel=1e-5) and raw_norm > 0
    assert float(optax.global_norm(raw)) == pytest.approx(raw_norm, rel=1e-5)  # off: untouched
    assert float(optax.global_norm(normed)) == pytest.approx(0.5, rel=1e-4)  # on: norm 0.5, any size
    for a, b in zip(jax.tree.leaves(normed), jax.tree.leaves(raw)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) * 0.5 / raw_norm, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("settings, expected", [
    ({"meta_global_clip": 0.5}, lambda lr: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr))),
    ({"meta_grad_clip": 1.0}, lambda lr: optax.chain(optax.clip(1.0), optax.adam(lr))),
    ({}, lambda lr: optax.adam(lr)),
])
def test_meta_gradient_clips_change_the_meta_update_as_specified(settings, expected):
    cfg = _tiny(optimizer="rlc2024", meta_max_norm=0, meta_learning_rate=1e-2, **settings)
    trainer = MetaTrainer(cfg)
    phi = trainer.init().phi
    rng = np.random.default_rng(1)
    # Two meta-gradients of very different sizes, with elements beyond 1: each clip acts.
    grads = [jax.tree.map(lambda x, s=s: jnp.asarray(rng.normal(0, s, x.shape), jnp.float32), phi)
             for s in (3.0, 0.01)]
    reference = expected(cfg.meta_learning_rate)
    ours, ref = trainer.meta_tx.init(phi), reference.init(phi)
    plain = optax.adam(cfg.meta_learning_rate)
    plain_state = plain.init(phi)
    for g in grads:
        u, ours = trainer.meta_tx.update(g, ours, phi)
        v, ref = reference.update(g, ref, phi)
        w, plain_state = plain.update(g, plain_state, phi)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-12)
    differs = any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(w)))
    assert differs == bool(settings)  # a clip changes Adam's second step; no clip is plain Adam
