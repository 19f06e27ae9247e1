"""Tests of optim4rl.optimizers: update formulas against NumPy, training, meta-gradients, files."""

from __future__ import annotations

import json
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training.train_state import TrainState

import optim4rl
from optim4rl import optimizers
from optim4rl.errors import ConfigError, ParameterFileError
from optim4rl.optimizers import L2L, LEARNED, STAR, Lin, Optim4RL

# --------------------------------------------------------------------------------------------
# NumPy re-computation of the docs/paper_settings.md §1 formulas (float64), independent of the JAX code paths.
# --------------------------------------------------------------------------------------------


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_gru(p, h, x):
    """flax GRUCell equations; gates (r, z, n) stacked along the last axis of wi / wh / b."""
    size = h.shape[-1]
    wi, wh, b, bhn = (np.asarray(p[k], np.float64) for k in ("wi", "wh", "b", "bhn"))
    gate = [slice(0, size), slice(size, 2 * size), slice(2 * size, 3 * size)]
    r = np_sigmoid(x @ wi[:, gate[0]] + h @ wh[:, gate[0]] + b[gate[0]])
    z = np_sigmoid(x @ wi[:, gate[1]] + h @ wh[:, gate[1]] + b[gate[1]])
    n = np.tanh(x @ wi[:, gate[2]] + b[gate[2]] + r * (h @ wh[:, gate[2]] + bhn))
    return (1 - z) * n + z * h


def np_mlp(p, x):
    for i in range(len(p)):
        x = x @ np.asarray(p[f"dense{i}"]["w"], np.float64) + np.asarray(p[f"dense{i}"]["b"],
                                                                         np.float64)
        if i < len(p) - 1:
            x = np.maximum(x, 0.0)
    return x


def np_optim4rl(phi, g, state, lr, inputs, sign_flip=False):
    h_m, h_v = state
    if inputs == "sign_log":
        x_m = np.stack([np.sign(g), np.log(np.abs(g) + 1e-18)], -1)
        x_v = 2.0 * np.log(np.abs(g) + 1e-18)[:, None]
    else:
        x_m, x_v = g[:, None], (g ** 2)[:, None]
    h_m, h_v = np_gru(phi["gru_m"], h_m, x_m), np_gru(phi["gru_v"], h_v, x_v)
    out_m, o2 = np_mlp(phi["head_m"], h_m), np_mlp(phi["head_v"], h_v)[:, 0]
    if sign_flip:  # the reference code's learned sign: +1 where tanh(o + 1) >= 0, else -1
        flip = np.where(np.tanh(out_m[:, 0] + 1.0) >= 0.0, 1.0, -1.0)
        m = flip * np.sign(g) * np.exp(out_m[:, 1])
    else:
        m = np.sign(g) * np.exp(out_m[:, 0])
    v = np.exp(o2)
    return -lr * m / np.sqrt(v + 1e-8), (h_m, h_v)


def np_l2l(phi, g, state, lr):
    p = 10.0
    large = np.log(np.abs(g) + 1e-8) / p >= -1.0
    x = np.where(large[:, None],
                 np.stack([np.log(np.abs(g) + 1e-8) / p, np.sign(g)], -1),
                 np.stack([-np.ones_like(g), np.exp(p) * g], -1))
    h = np_gru(phi["gru"], state, x)
    o = np_mlp(phi["head"], h)[:, 0]
    return -lr * np.exp(o) * g, h


def np_lin(phi, g, state, lr):
    h = np_gru(phi["gru"], state, g[:, None])
    o = np_mlp(phi["head"], h)
    return -lr * (np.exp(o[:, 0]) * g + np.exp(o[:, 1]) * o[:, 2]), h


def np_star(phi, g, state, lr, params, leaf_sizes):
    momentum, rms, fac, count = state

    def decay(initial, shift):
        return 1 - (1 - np.asarray(initial)) * np.exp(10 * np.asarray(shift, np.float64))

    d_m = decay([0.9, 0.99, 0.999], phi["momentum_decay_shift"])
    d_r = np.clip(decay([0.999], phi["rms_decay_shift"]), 0, 1)
    d_f = np.clip(decay([0.9, 0.99, 0.999], phi["adafactor_decay_shift"]), 0, 1)
    col = g[:, None]
    momentum = d_m * momentum + (1 - d_m) * col
    rms = d_r * rms + (1 - d_r) * col ** 2
    fac = d_f * fac + (1 - d_f) * (col ** 2 + 1e-30)
    adam = momentum / np.sqrt(rms + 1e-6)
    features = np.concatenate([
        col, params[:, None], momentum, rms, adam, 1 / np.sqrt(rms + 1e-6),
        col / np.sqrt(np.maximum(fac + 1e-9, 1e-9)), fac, fac,
        1 / np.sqrt(fac + 1e-8), 1 / np.sqrt(fac + 1e-8), momentum / np.sqrt(fac + 1e-6)], -1)
    start = 0
    for size in leaf_sizes:  # second-moment normalisation over each tensor
        block = features[start:start + size]
        features[start:start + size] = block / np.sqrt(1e-5 + np.mean(block ** 2, axis=0))
        start += size
    timescales = np.array([1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000.0])
    embedding = np.tanh(count / timescales - 1.0)
    x = np.concatenate([features, np.broadcast_to(embedding, (len(g), 11))], -1)
    out = np_mlp(phi["mlp"], x)
    step = out[:, 0] * np.exp(0.001 * out[:, 1]) * lr
    nominal = 1e-3 * np.exp(0.001) * np.mean(adam, -1)
    return -(step + nominal), (momentum, rms, fac, count + 1)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------

LEARNED_CASES = {
    "optim4rl": Optim4RL(),
    "optim4rl_raw": Optim4RL(inputs="raw"),
    "optim4rl_sign_flip": Optim4RL(sign_flip=True),
    "l2l": L2L(),
    "lin": Lin(),
    "star": STAR(),
}


def random_phi(opt, seed, scale=0.5):
    """Hand-set meta-parameters: every tensor, biases included, random."""
    rng = np.random.default_rng(seed)
    phi = jax.eval_shape(opt.init_meta, jax.random.key(seed))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        leaf_scale = 0.02 if "decay_shift" in name else scale
        return jnp.asarray(rng.normal(size=leaf.shape) * leaf_scale, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, phi)


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def random_grads(rng, params):
    """Gradients of random sign spanning 1e-7 .. 3, plus one exact zero."""
    def draw(leaf):
        magnitude = 10.0 ** rng.uniform(-7, 0.5, size=leaf.shape)
        return jnp.asarray(rng.choice([-1.0, 1.0], size=leaf.shape) * magnitude, jnp.float32)

    grads = jax.tree.map(draw, params)
    grads["bias"] = grads["bias"].at[0].set(0.0)
    return grads


def small_params(rng):
    return {"bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
            "kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "scalar": jnp.asarray(rng.normal(), jnp.float32)}


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# --------------------------------------------------------------------------------------------
# Exact update values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(LEARNED_CASES))
def test_update_matches_numpy_formulas(case):
    opt = LEARNED_CASES[case]
    rng = np.random.default_rng(1)
    phi = random_phi(opt, seed=2)
    phi_np = to_numpy(phi)
    lr, clip = 3e-3, 1.0
    params = small_params(rng)
    tx = opt.transform(phi, learning_rate=lr, grad_clip=clip)
    state = tx.init(params)
    update = jax.jit(tx.update)
    leaf_sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
    n = sum(leaf_sizes)
    if case == "star":
        np_state = (np.zeros((n, 3)), np.zeros((n, 1)), np.zeros((n, 3)), 0)
    elif case.startswith("optim4rl"):
        np_state = (np.zeros((n, 8)), np.zeros((n, 8)))
    else:
        np_state = np.zeros((n, 8))

    for _ in range(3):  # state carried across steps
        grads = random_grads(rng, params)
        g = np.clip(flat(grads), -clip, clip)
        if case.startswith("optim4rl"):
            expected, np_state = np_optim4rl(phi_np, g, np_state, lr, opt.inputs, opt.sign_flip)
        elif case == "l2l":
            expected, np_state = np_l2l(phi_np, g, np_state, lr)
        elif case == "lin":
            expected, np_state = np_lin(phi_np, g, np_state, lr)
        else:
            expected, np_state = np_star(phi_np, g, np_state, lr, flat(params), leaf_sizes)
        updates, state = update(grads, state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        np.testing.assert_allclose(flat(updates), expected, rtol=2e-4,
                                   atol=1e-6 * np.max(np.abs(expected)))
        params = optax.apply_updates(params, updates)
    assert int(state.count) == 3


@pytest.mark.parametrize("inputs", ["sign_log", "raw"])
def test_optim4rl_update_has_sign_of_minus_gradient(inputs):
    opt = Optim4RL(inputs=inputs)
    rng = np.random.default_rng(3)
    params = small_params(rng)

    @jax.jit
    def update(phi, grads, state):
        return opt.transform(phi, learning_rate=1e-3).update(grads, state)

    for seed in range(3):
        phi = random_phi(opt, seed, scale=0.5)
        state = opt.transform(phi, learning_rate=1e-3).init(params)
        for _ in range(3):
            grads = random_grads(rng, params)
            updates, state = update(phi, grads, state)
            np.testing.assert_array_equal(np.sign(flat(updates)), -np.sign(flat(grads)))


def test_gradient_processing_loses_no_information():
    magnitudes = np.logspace(-30, 3, 331)
    grads = np.concatenate([magnitudes, -magnitudes]).astype(np.float32)
    # With log_eps far below the smallest |g|, g is recovered over the whole range 1e-30..1e3.
    (sign_log, _), cases = Optim4RL(log_eps=1e-38).network_inputs(jnp.asarray(grads)), []
    cases.append((np.asarray(sign_log, np.float64).T, 1e-38, np.ones_like(grads, bool)))
    # With the default log_eps = 1e-18 (the paper's value), the same holds wherever |g| ≥ 1e-18.
    default_inputs, _ = Optim4RL().network_inputs(jnp.asarray(grads))
    cases.append((np.asarray(default_inputs, np.float64).T, 1e-18, np.abs(grads) >= 1e-18))
    for pair, eps, where in cases:
        recovered = pair[:, 0] * (np.exp(pair[:, 1]) - eps)
        np.testing.assert_allclose(recovered[where], grads[where], rtol=2e-5)
        assert len(np.unique(pair[where], axis=0)) == np.sum(where)  # distinct stay distinct


def test_log_scale_multiplies_the_log_features_and_old_files_keep_the_paper_default():
    grads = jnp.asarray([1e-6, -3e-2, 0.5])
    (pair, log_g2) = Optim4RL().network_inputs(grads)
    (scaled_pair, scaled_log_g2) = Optim4RL(log_scale=0.1).network_inputs(grads)
    np.testing.assert_array_equal(scaled_pair[0], pair[0])  # the sign is untouched
    np.testing.assert_allclose(scaled_pair[1], 0.1 * pair[1], rtol=1e-6)
    np.testing.assert_allclose(scaled_log_g2, 0.1 * log_g2, rtol=1e-6)
    # A file written before the field existed has no "log_scale": it loads as the paper's 1.0.
    config = Optim4RL().config()
    del config["log_scale"]
    assert Optim4RL.from_config(config).log_scale == 1.0
    assert Optim4RL.from_config(Optim4RL(log_scale=0.1).config()).log_scale == 0.1
    with pytest.raises(ValueError, match="log_scale"):
        Optim4RL(log_scale=0.0)


def test_sign_flip_is_straight_through_and_off_in_old_files():
    opt = Optim4RL(sign_flip=True)
    phi = opt.init_meta(jax.random.PRNGKey(0))
    assert phi["head_m"]["dense2"]["w"].shape == (16, 2)  # (sign, log-magnitude)
    grads = {"w": jnp.asarray([0.3, -2e-3, 5e-6, -0.7])}
    tx = opt.transform(phi, learning_rate=1e-2)
    updates, _ = tx.update(grads, tx.init(grads))
    # At initialisation the bias keeps the sign at +1: every step opposes the gradient.
    np.testing.assert_array_equal(np.sign(updates["w"]), -np.sign(grads["w"]))

    # Pushing the sign output far below -bias flips every step to the gradient's own sign.
    last = phi["head_m"]["dense2"]
    flipped = {**phi, "head_m": {**phi["head_m"], "dense2": {**last, "b": last["b"].at[0].add(-50.0)}}}
    tx = opt.transform(flipped, learning_rate=1e-2)
    updates, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_array_equal(np.sign(updates["w"]), np.sign(grads["w"]))

    # The hard sign passes the gradient of tanh (straight through), so phi's sign output learns.
    def loss(phi):
        tx = opt.transform(phi, learning_rate=1e-2)
        updates, _ = tx.update(grads, tx.init(grads))
        return jnp.sum(updates["w"] * grads["w"])
    meta_grads = jax.grad(loss)(phi)
    assert np.asarray(meta_grads["head_m"]["dense2"]["b"])[0] != 0.0

    config = Optim4RL().config()  # files written before the option existed load with it off
    del config["sign_flip"], config["sign_bias"]
    assert Optim4RL.from_config(config) == Optim4RL()
    with pytest.raises(ValueError, match="sign_flip"):
        Optim4RL(sign_flip="yes")


def test_l2l_preprocessing_cases():
    g = jnp.asarray([1.0, -0.5, 1e-6, -1e-7, 0.0])
    features = np.asarray(optimizers.l2l_features(g)).T
    np.testing.assert_allclose(features[0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(features[1], [np.log(0.5 + 1e-8) / 10, -1.0], rtol=1e-5)
    np.testing.assert_allclose(features[2], [-1.0, np.exp(10.0) * 1e-6], rtol=1e-5)
    np.testing.assert_allclose(features[3], [-1.0, -np.exp(10.0) * 1e-7], rtol=1e-5)
    np.testing.assert_allclose(features[4], [-1.0, 0.0])


def test_star_needs_params_and_accepts_schedules():
    opt = STAR()
    params = {"w": jnp.ones((4,))}
    tx = opt.transform(random_phi(opt, seed=0, scale=0.3), optax.linear_schedule(1e-3, 0.0, 10))
    state = tx.init(params)
    with pytest.raises(ValueError, match="reads the parameters"):
        tx.update(params, state)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))


# --------------------------------------------------------------------------------------------
# Training with optax.chain + flax TrainState + jit + vmap over seeds + lax.scan
# --------------------------------------------------------------------------------------------


class RegressionMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.tanh(nn.Dense(16)(x)))[..., 0]


TRAIN_CASES = {  # spec, learning rate, architecture options
    "adam": ("adam", 1e-2, {}),
    "rmsprop": ("rmsprop", 1e-2, {}),
    "sgd": ("sgd", 1e-1, {}),
    "optim4rl": ("optim4rl:init", 1e-2, {}),
    "optim4rl_raw": ("optim4rl:init", 1e-2, {"inputs": "raw"}),
    "l2l": ("l2l:init", 1e-1, {}),
    "lin": ("lin:init", 1e-1, {}),
    "star": ("star:init", 1e-3, {}),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_trains_regression_mlp(case):
    spec, lr, options = TRAIN_CASES[case]
    tx = optax.chain(optax.clip_by_global_norm(10.0),
                     optim4rl.make_optimizer(spec, lr, grad_clip=1.0, **options))
    model = RegressionMLP()
    x = jax.random.uniform(jax.random.key(1), (64, 2), minval=-1.0, maxval=1.0)
    y = jnp.sin(2.0 * x[:, 0]) + 0.5 * x[:, 1]

    def loss_fn(params):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    def init(key):
        return TrainState.create(apply_fn=model.apply, params=model.init(key, x), tx=tx)

    def run(state):
        def train_step(state, _):
            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            return state.apply_gradients(grads=grads), loss

        state, losses = jax.lax.scan(train_step, state, None, length=80)
        return losses[0], loss_fn(state.params)

    states = jax.vmap(init)(jax.random.split(jax.random.key(0), 3))
    first, last = jax.jit(jax.vmap(run))(states)
    assert np.all(np.isfinite(np.asarray(last)))
    assert np.all(np.asarray(last) < 0.5 * np.asarray(first)), (first, last)


# --------------------------------------------------------------------------------------------
# Meta-gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(LEARNED_CASES))
def test_meta_gradient_through_update_is_finite_and_nonzero(case):
    opt = LEARNED_CASES[case]
    target = jnp.asarray(np.random.default_rng(0).normal(size=(6,)), jnp.float32)

    def inner_loss(params):
        return jnp.sum((params["w"] - target) ** 2) + jnp.sum(params["b"] ** 2)

    def meta_loss(phi):
        tx = opt.transform(phi, learning_rate=1e-1, grad_clip=1.0)  # phi is a tracer here
        params = {"w": jnp.zeros((6,)), "b": jnp.ones((2,))}
        state = tx.init(params)
        for _ in range(3):
            grads = jax.grad(inner_loss)(params)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return inner_loss(params)

    meta_grads = jax.jit(jax.grad(meta_loss))(random_phi(opt, seed=0, scale=0.3))
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(meta_grads)]
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert sum(float(np.sum(leaf ** 2)) for leaf in leaves) > 0.0
    assert np.mean([np.any(leaf != 0) for leaf in leaves]) > 0.5  # most tensors get a gradient


# --------------------------------------------------------------------------------------------
# Parameter files
# --------------------------------------------------------------------------------------------

INFO = {"command": "optim4rl meta-train --preset grid6", "seed": 3, "config": {"lr": 1e-3}}


@pytest.mark.parametrize("opt", [Optim4RL(), Optim4RL(inputs="raw", head_sizes=()), L2L(), Lin(),
                                 STAR(hidden_size=6)], ids=lambda opt: opt.name)
def test_save_load_is_bit_exact(tmp_path, opt):
    phi = random_phi(opt, seed=5)
    path = optimizers.save(tmp_path / "sub" / "opt.o4r", opt, phi, info=INFO)
    assert os.listdir(tmp_path / "sub") == ["opt.o4r"]  # no temporary file left behind
    loaded_opt, loaded_phi, info = optimizers.load(path)
    assert loaded_opt == opt and info == INFO
    assert jax.tree.structure(loaded_phi) == jax.tree.structure(phi)
    for a, b in zip(jax.tree.leaves(phi), jax.tree.leaves(loaded_phi)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_save_rejects_wrong_meta_parameters(tmp_path):
    with pytest.raises(ValueError, match="do not match"):
        optimizers.save(tmp_path / "x.o4r", Optim4RL(), random_phi(L2L(), seed=0))
    with pytest.raises(ValueError, match="JSON"):
        optimizers.save(tmp_path / "x.o4r", L2L(), random_phi(L2L(), seed=0), info={"x": object()})
    assert not list(tmp_path.iterdir())


def split_file(blob):
    _, version, header_length = struct.unpack_from("<8sIQ", blob)
    header = json.loads(blob[20:20 + header_length])
    return header, blob[20 + header_length:]


def join_file(header, data, version=1):
    header_bytes = json.dumps(header).encode()
    preamble = struct.pack("<8sIQ", b"\x89O4R\r\n\x1a\n", version, len(header_bytes))
    return preamble + header_bytes + data


def rewrite_header(blob, **changes):
    header, data = split_file(blob)
    header.update(changes)
    return join_file(header, data)


def bad_files(blob):
    """(case, file content or None for a missing file, words the message must contain)."""
    header, data = split_file(blob)
    yield "missing", None, "no such"
    yield "empty", b"", "empty"
    yield "text file", b"hello world, not a parameter file\n" * 4, "bad magic"
    yield "pickle", b"\x80\x04\x95" + blob[3:], "bad magic"
    yield "future version", blob[:8] + struct.pack("<I", 7) + blob[12:], "format version 7"
    yield "truncated preamble", blob[:14], "truncated"
    yield "truncated header", blob[:40], "truncated"
    yield "truncated data", blob[:-10], "truncated"
    flipped = bytearray(blob)
    flipped[-3] ^= 0x40
    yield "flipped bit", bytes(flipped), "checksum"
    yield "trailing bytes", blob + b"\0\0\0\0", "unexpected bytes"
    yield "broken header", blob[:25] + b"}" + blob[26:], "header"
    yield ("unknown architecture", rewrite_header(blob, architecture="velo2"),
           "unknown optimizer architecture")
    config = dict(header["config"], hidden_size=4)
    yield "tensors of another size", rewrite_header(blob, config=config), "do not match"
    tensors = [dict(t, name="renamed") if i == 0 else t for i, t in enumerate(header["tensors"])]
    yield "renamed tensor", rewrite_header(blob, tensors=tensors), "missing"
    yield "bad config", rewrite_header(blob, config={"colour": "red"}), "config"


def test_bad_files_raise_one_clear_line(tmp_path):
    opt = Optim4RL()
    good = optimizers.save(tmp_path / "good.o4r", opt, random_phi(opt, seed=0))
    blob = good.read_bytes()
    for case, content, words in bad_files(blob):
        path = tmp_path / f"{case.replace(' ', '_')}.o4r"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ParameterFileError) as raised:
            optimizers.load(path)
        message = str(raised.value)
        assert "\n" not in message and message.startswith(str(path)), (case, message)
        assert words in message, (case, message)


# --------------------------------------------------------------------------------------------
# make_optimizer
# --------------------------------------------------------------------------------------------


def test_make_optimizer_hand_designed_and_clipping():
    params = {"w": jnp.zeros((3,))}
    grads = {"w": jnp.asarray([10.0, -0.5, 0.1])}
    sgd = optim4rl.make_optimizer("SGD", learning_rate=1.0, grad_clip=1.0)
    updates, _ = sgd.update(grads, sgd.init(params))
    np.testing.assert_allclose(updates["w"], [-1.0, 0.5, -0.1], rtol=1e-6)
    sgd = optim4rl.make_optimizer("sgd", learning_rate=1.0, global_clip=1.0)
    updates, _ = sgd.update(grads, sgd.init(params))
    np.testing.assert_allclose(np.linalg.norm(updates["w"]), 1.0, rtol=1e-5)
    adam = optim4rl.make_optimizer("adam", learning_rate=1e-3, b1=0.5)
    assert adam.update(grads, adam.init(params))[0]["w"].shape == (3,)
    assert "rmsprop" in optimizers.list_optimizers() and "star" in optimizers.list_optimizers()


def test_make_optimizer_learned_sources(tmp_path, monkeypatch):
    params = {"w": jnp.ones((4,))}
    grads = {"w": jnp.asarray([0.3, -0.2, 1e-5, 2.0])}

    def first_update(tx):
        return np.asarray(tx.update(grads, tx.init(params), params)[0]["w"])

    opt, phi, info = optimizers.learned_from_spec("optim4rl:init", inputs="raw")
    assert opt == Optim4RL(inputs="raw") and info == {"source": "init", "seed": 0}
    expected = first_update(opt.transform(phi, 1e-3, grad_clip=1.0))
    assert np.all(expected * np.asarray(grads["w"]) < 0)

    path = optimizers.save(tmp_path / "mine.o4r", opt, phi, info=INFO)
    np.testing.assert_array_equal(
        first_update(optim4rl.make_optimizer(f"optim4rl:{path}", 1e-3, grad_clip=1.0)), expected)

    monkeypatch.setattr(optimizers.registry, "PRETRAINED_DIR", tmp_path)
    assert optimizers.list_pretrained() == ["mine"]
    tx = optim4rl.make_optimizer("Optim4RL:mine", 1e-3, grad_clip=1.0, global_clip=100.0)
    np.testing.assert_array_equal(first_update(tx), expected)
    loaded_opt, _, info = optimizers.learned_from_spec("optim4rl:mine")
    assert loaded_opt == opt and info == INFO


@pytest.mark.parametrize("spec, options, error, words", [
    ("adamm", {}, ConfigError, "unknown optimizer 'adamm'; known: adabelief"),
    ("", {}, ConfigError, "non-empty"),
    ("adam", {"colour": 1}, ConfigError, "bad options for optimizer 'adam'"),
    ("optim4rl", {}, ConfigError, "'optim4rl:init'"),
    ("optim5rl:init", {}, ConfigError, "learned: optim4rl, l2l, lin, star"),
    ("optim4rl:", {}, ConfigError, "give a source"),
    ("optim4rl:no_such_pretrained", {}, ConfigError, "unknown pretrained optimizer"),
    ("optim4rl:init", {"inputs": "cooked"}, ConfigError, "inputs must be one of"),
    ("optim4rl:init", {"depth": 3}, ConfigError, "bad options for optim4rl"),
    ("velo:velo.o4r", {}, ConfigError, "VeLO"),
    ("optim4rl:missing/opt.o4r", {}, ParameterFileError, "no such"),
])
def test_make_optimizer_errors(spec, options, error, words):
    with pytest.raises(error) as raised:
        optim4rl.make_optimizer(spec, 1e-3, **options)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_make_optimizer_file_errors(tmp_path):
    path = optimizers.save(tmp_path / "l2l.o4r", L2L(), random_phi(L2L(), seed=0))
    with pytest.raises(ParameterFileError, match="holds a 'l2l' optimizer, not 'optim4rl'"):
        optim4rl.make_optimizer(f"optim4rl:{path}", 1e-3)
    with pytest.raises(ConfigError, match="only allowed with 'l2l:init'"):
        optim4rl.make_optimizer(f"l2l:{path}", 1e-3, p=5.0)


def test_learned_registry():
    assert LEARNED == {"optim4rl": Optim4RL, "l2l": L2L, "lin": Lin, "star": STAR}
    for name, cls in LEARNED.items():
        assert cls.name == name and cls() == cls.from_config(cls().config())
        hash(cls())  # frozen architectures can be closed over / used as static jit args


@pytest.mark.parametrize("spec", ["optim4rl:grid6", "l2l:init", "lin:init", "star:init"])
def test_learned_optimizers_take_extra_args_and_keep_the_parameters_dtype(spec):
    tx = optim4rl.make_optimizer(spec, learning_rate=1e-3, grad_clip=1.0)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = {"w": jnp.full((3, 2), 0.5, jnp.bfloat16), "b": jnp.full((2,), 0.5, jnp.float32)}
    grads = {"w": jnp.full((3, 2), 1e-2, jnp.bfloat16), "b": jnp.full((2,), 1e-2, jnp.float32)}
    state = tx.init(params)
    # Extra keyword arguments (optax.chain passes e.g. `value` to every member) are ignored.
    updates, _ = tx.update(grads, state, params, value=jnp.float32(1.0), grad=grads)
    plain, _ = tx.update(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32),
                                  np.asarray(plain["w"], np.float32))
    # The bf16 update is the float32 network's update, rounded once.
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    grads32 = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
    full, _ = tx.update(grads32, tx.init(params32), params32)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), np.asarray(full["w"]),
                               rtol=1e-2)
    # It composes with optax's extra-args chains.
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    chained.update(grads, chained.init(params), params, value=jnp.float32(1.0))
