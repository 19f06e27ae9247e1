"""The fused CPU kernel (optim4rl.optimizers.native) computes what the JAX network computes.

Every comparison runs the same update twice, once through the kernel and once with it turned off
(plain JAX), on the same inputs: outputs, hidden states, vmapped populations, partial tiles,
zero and non-finite gradients, the backward pass (the vector-Jacobian product: cotangents of φ,
of the gradient and of both hidden states) and meta-gradients through several updates (forward
and backward passes through the kernel). Where a C++ compiler exists the kernel must build: a machine that has one but cannot
build it would silently run 2x slower.
"""

from __future__ import annotations

import contextlib
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim4rl
from optim4rl.optimizers import native
from optim4rl.optimizers.gru_optimizers import L2L, Lin, Optim4RL

ARCHITECTURES = {
    "default": Optim4RL(),
    "rlc2024": Optim4RL(inputs="raw", head_sizes=()),
    "raw_mlp": Optim4RL(inputs="raw"),
    "log_scale": Optim4RL(log_scale=0.1),
    "l2l": L2L(),
    "l2l_linear": L2L(head_sizes=()),
    "lin": Lin(),
    "lin_linear": Lin(head_sizes=()),
}
# Reordered float32 sums and ~1-ulp transcendentals, over a few recurrent steps. Hidden states
# (of order one, some near zero after cancellations) get an absolute tolerance; updates (of
# order α = 1e-3, exactly zero where the gradient is) a relative one.
TOLERANCE = {"update": {"rtol": 2e-5, "atol": 1e-12},
             "hidden": {"rtol": 2e-5, "atol": 2e-6}}
# Lin's update is a sum of two terms of order α that may cancel: its rounding is relative to them.
LIN_UPDATE = {"rtol": 2e-5, "atol": 1e-9}


def hidden_states(state) -> tuple:
    """The recurrent states of an optimizer state, ``[..., H, N]`` each."""
    return (state.hidden_m, state.hidden_v) if hasattr(state, "hidden_m") else (state.hidden,)

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"fused kernel not built: {native.status()}")


def perturbed_phi(opt, seed=0, scale=0.3):
    """Meta-parameters away from their initialisation (non-zero biases), so every term counts."""
    phi = opt.init_meta(jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(phi)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape)
                                        for x, k in zip(leaves, keys)])


def gradient_stream(shape, steps=4, seed=2):
    """Gradients over many magnitudes, a third of them exactly zero (as in A2C)."""
    keys = jax.random.split(jax.random.key(seed), steps)
    out = []
    for key in keys:
        k1, k2, k3 = jax.random.split(key, 3)
        g = jax.random.normal(k1, shape) * jnp.exp(jax.random.uniform(k2, shape, minval=-16, maxval=1))
        out.append(jnp.where(jax.random.uniform(k3, shape) < 0.33, 0.0, g))
    return out


def run_steps(opt, phi, grads, vmapped, use_native):
    """(update, *hidden states) after each step of `grads`, jitted afresh."""
    context = contextlib.nullcontext() if use_native else native.disabled()
    with context:
        tx = opt.transform(phi, learning_rate=1e-3)
        init, update = tx.init, tx.update
        if vmapped:
            init, update = jax.vmap(init), jax.vmap(update)
        step = jax.jit(lambda g, s: update(g, s))  # a new function: traced under `context`
        state = init(grads[0])
        outputs = []
        for g in grads:
            delta, state = step(g, state)
            outputs.append((np.asarray(delta),) + tuple(np.asarray(h) for h in hidden_states(state)))
    return outputs


def test_the_kernel_builds_where_a_compiler_exists():
    if shutil.which("c++") or shutil.which("g++"):
        assert native.status() == "native", native.status()


@pytest.mark.parametrize("label", sorted(ARCHITECTURES))
@pytest.mark.parametrize("vmapped", [False, True], ids=["single", "population"])
def test_kernel_equals_the_jax_network(label, vmapped):
    opt = ARCHITECTURES[label]
    phi = perturbed_phi(opt)
    assert native.kernel_for(opt) is not None
    # 3 agents of 1,037 coordinates: several threads' chunks and a partial last tile per row.
    shape = (3, 1037) if vmapped else (5003,)
    grads = gradient_stream(shape)
    fused = run_steps(opt, phi, grads, vmapped, use_native=True)
    plain = run_steps(opt, phi, grads, vmapped, use_native=False)
    for step, (a, b) in enumerate(zip(fused, plain)):
        for i, (x, y) in enumerate(zip(a, b)):
            tolerance = TOLERANCE["hidden"] if i else (
                LIN_UPDATE if opt.name == "lin" else TOLERANCE["update"])
            np.testing.assert_allclose(x, y, err_msg=f"{label} step {step} output {i}", **tolerance)
        assert np.any(a[0] != 0.0)


@pytest.mark.parametrize("label,target", [("default", native.TARGET), ("l2l", native.SINGLE_TARGET),
                                          ("lin", native.SINGLE_TARGET)])
def test_the_kernel_is_traced_into_the_update(label, target):
    opt = ARCHITECTURES[label]
    tx = opt.transform(opt.init_meta(jax.random.key(0)), 1e-3)
    params = jnp.zeros((100,))
    text = jax.jit(tx.update).lower(params, tx.init(params)).as_text()
    assert target in text
    with native.disabled():
        text = jax.jit(lambda g, s: tx.update(g, s)).lower(params, tx.init(params)).as_text()
    assert target not in text


@pytest.mark.parametrize("label", ["default", "l2l", "lin"])
def test_non_finite_gradients_stay_non_finite(label):
    # A nan or inf gradient must not become a finite update (the run would hide its divergence).
    opt = ARCHITECTURES[label]
    for use_native in (True, False):
        with contextlib.nullcontext() if use_native else native.disabled():
            tx = opt.transform(perturbed_phi(opt), 1e-3)
            g = jnp.array([1e-3, jnp.nan, -2e-3, 0.0] * 5)
            delta, state = jax.jit(lambda g, s: tx.update(g, s))(g, tx.init(g))
        assert np.isnan(np.asarray(delta)[1::4]).all(), use_native
        assert np.isfinite(np.asarray(delta)[0::4]).all(), use_native
        assert np.isnan(np.asarray(hidden_states(state)[0])[:, 1]).all(), use_native


def test_unsupported_architectures_run_as_jax():
    assert native.kernel_for(Optim4RL(sign_flip=True)) is None
    assert native.kernel_for(Optim4RL(head_sizes=(32,))) is None
    assert native.kernel_for(Optim4RL(hidden_size=4)) is None
    assert native.kernel_for(L2L(hidden_size=4)) is None
    assert native.kernel_for(Lin(head_sizes=(16,))) is None
    with native.disabled():
        assert native.kernel_for(Optim4RL()) is None
        assert native.status() == "off"
    # and they still work
    tx = optim4rl.make_optimizer("optim4rl:init", learning_rate=1e-3, hidden_size=4)
    g = jnp.ones((10,))
    assert np.isfinite(np.asarray(tx.update(g, tx.init(g))[0])).all()


@pytest.mark.parametrize("label", sorted(ARCHITECTURES))
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=["single", "population", "nested"])
def test_the_backward_kernel_equals_the_jax_vjp(label, batch):
    # The kernel's VJP against jax.vjp of the JAX network, per batch member (as coordinatewise
    # needs it), on 1,000 coordinates (a partial last tile) with random cotangents.
    opt = ARCHITECTURES[label]
    kernel = native.kernel_for(opt)
    phi = perturbed_phi(opt, scale=0.3)
    n, hidden = 1000, opt.hidden_size
    states = len(hidden_states(opt.init_state(1)))
    keys = jax.random.split(jax.random.key(5), 2 + 2 * states)
    g = gradient_stream(batch + (n,), steps=1)[0]
    hs = tuple(jax.random.normal(keys[i], batch + (hidden, n)) for i in range(states))
    cot = (jax.random.normal(keys[states], batch + (n,)),) + tuple(
        jax.random.normal(keys[states + 1 + i], batch + (hidden, n)) for i in range(states))
    columns = (g,) + hs
    dphi, dcolumns = jax.jit(lambda p, c, t: kernel.backward(p, c, t, len(batch)))(phi, columns, cot)

    def one(p, columns, cot):
        _, vjp = jax.vjp(lambda p, c: tuple(opt._network(p, c)), p, columns)
        return vjp(cot)

    expected = one
    for _ in batch:
        expected = jax.vmap(expected)
    expected = jax.jit(expected)(jax.tree.map(lambda x: jnp.broadcast_to(x, batch + x.shape), phi),
                                 columns, cot)
    got_leaves, want_leaves = jax.tree.leaves((dphi, dcolumns)), jax.tree.leaves(expected)
    assert len(got_leaves) == len(want_leaves)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((dphi, dcolumns)), want_leaves):
        assert a.shape == b.shape, path
        scale = float(np.max(np.abs(b))) or 1.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


@pytest.mark.parametrize("label", sorted(ARCHITECTURES))
def test_meta_gradients_through_the_kernel_equal_the_jax_ones(label):
    # Meta-training differentiates a loss through the updates: forward and backward passes run
    # through the kernel; the result must equal the JAX network's.
    opt = ARCHITECTURES[label]
    phi = perturbed_phi(opt, scale=0.1)
    grads = gradient_stream((2, 777), steps=3)
    target = jax.random.normal(jax.random.key(9), (2, 777))

    def loss(phi):
        tx = opt.transform(phi, learning_rate=1e-2)
        params = jnp.zeros((2, 777))
        state = jax.vmap(tx.init)(params)
        for g in grads:
            delta, state = jax.vmap(tx.update)(g, state)
            params = params + delta
        return jnp.sum((params - 1e-2 * target) ** 2)

    fused = jax.jit(jax.grad(lambda p: loss(p)))(phi)
    with native.disabled():
        plain = jax.jit(jax.grad(lambda p: loss(p)))(phi)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(fused), jax.tree.leaves(plain)):
        scale = float(np.max(np.abs(b))) or 1.0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))


SHARDED = r"""
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from optim4rl.optimizers import native
from optim4rl.optimizers import STAR
from optim4rl.optimizers.gru_optimizers import L2L, Lin, Optim4RL
assert jax.device_count() == 4 and native.library() is not None
n = 1000
grads = 1e-3 * jax.random.normal(jax.random.key(1), (8, n))
params = jnp.zeros((8, n))
rows = NamedSharding(Mesh(jax.devices(), ("pop",)), P("pop"))

for opt, target in ((Optim4RL(), "optim4rl_optim4rl"), (L2L(), "optim4rl_single"),
                    (Lin(), "optim4rl_single"), (STAR(), "optim4rl_star")):
    phi = opt.init_meta(jax.random.key(0))
    tx = opt.transform(phi, 1e-3)
    state = jax.vmap(lambda p: tx.init({"w": p}))(params)

    def update(g, s, p):  # a population of 8 agents, vmapped
        return jax.vmap(lambda g, s, p: tx.update({"w": g}, s, {"w": p}))(g, s, p)

    def meta_loss(phi, g, s, p):  # the meta-gradient's path: backward kernel through an update
        t = opt.transform(phi, 1e-3)
        u, _ = jax.vmap(lambda g, s, p: t.update({"w": g}, s, {"w": p}))(g, s, p)
        return jnp.sum(u["w"] ** 2)

    placed = [jax.device_put(x, rows) for x in (grads, state, params)]
    for f in (jax.jit(update), jax.jit(jax.grad(meta_loss))):
        args = placed if f.__wrapped__ is update else [phi] + placed
        hlo = f.lower(*args).compile().as_text()
        calls = [l for l in hlo.splitlines() if f'custom_call_target="{target}' in l]
        # (STAR's meta-gradient runs its forward kernel, then JAX's VJP.)
        assert len(calls) >= (1 if f.__wrapped__ is update or opt.name == "star" else 2), (opt.name, calls)
        # Each device runs the kernel on its own 2 of the 8 agents; nothing is gathered for it.
        assert all("f32[2,1000]" in l for l in calls), (opt.name, calls)
        assert not re.search(r"all-gather", hlo), opt.name
    a, _ = jax.jit(update)(*placed)
    b, _ = jax.jit(update)(grads, state, params)
    assert a["w"].sharding.spec == P("pop"), a["w"].sharding
    np.testing.assert_allclose(np.asarray(a["w"]), np.asarray(b["w"]), rtol=1e-6, atol=1e-12)
    ga = jax.jit(jax.grad(meta_loss))(phi, *placed)
    gb = jax.jit(jax.grad(meta_loss))(phi, grads, state, params)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(y)).max()) + 1e-30)
    print("OK", opt.name)
"""


def test_a_sharded_population_runs_the_kernel_on_each_devices_own_agents():
    """Under jax.sharding the kernels (forward and backward; Optim4RL's, the one-GRU baselines' and STAR's)
    run per device on that device's shard of the population, with the same numbers as on one
    device, instead of XLA gathering every input and running the whole call on every device."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[:4] == ["OK optim4rl", "OK l2l", "OK lin", "OK star"], proc.stdout


def test_one_phi_per_member_of_a_vmap_runs_through_the_kernel():
    """A vmap over φ itself (several optimizers at once) calls the kernel once per member; updates
    and meta-gradients equal the JAX network's."""
    opt = ARCHITECTURES["default"]
    phis = jax.vmap(opt.init_meta)(jax.random.split(jax.random.key(0), 3))
    grads = 1e-3 * jax.random.normal(jax.random.key(1), (3, 500))

    def update(phi, g):
        tx = opt.transform(phi, 1e-3)
        params = {"w": jnp.zeros(500)}
        return tx.update({"w": g}, tx.init(params), params)[0]["w"]

    def both(fn):
        out = jax.jit(fn)()
        with native.disabled():
            return out, jax.jit(fn)()

    a, b = both(lambda: jax.vmap(update)(phis, grads))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOLERANCE["update"])
    ga, gb = both(lambda: jax.grad(lambda ph: jax.vmap(update)(ph, grads).sum())(phis))
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4,
                                   atol=1e-5 * float(np.abs(np.asarray(y)).max()))


# STAR: the forward kernel (its meta-gradient is JAX's VJP of the same update). Tensors of
# awkward sizes: one coordinate, a partial tile, several threads' chunks, an empty one.
STAR_PARAMS = {"a": (1,), "b": (17,), "c": (33, 70), "d": (0,), "e": (16,)}


def star_params(lead=()):
    keys = jax.random.split(jax.random.key(5), len(STAR_PARAMS))
    return {name: jax.random.normal(k, lead + shape) for (name, shape), k in zip(STAR_PARAMS.items(), keys)}


def star_grads(lead=(), steps=4):
    streams = {name: gradient_stream(lead + shape, steps, seed=3 + i) if math.prod(shape) else
               [jnp.zeros(lead + shape)] * steps for i, (name, shape) in enumerate(STAR_PARAMS.items())}
    return [{name: streams[name][t] for name in STAR_PARAMS} for t in range(steps)]


def star_steps(opt, phi, lead, use_native):
    """(updates, state) after each of 4 steps, vmapped over the `lead` axes, jitted afresh."""
    with contextlib.nullcontext() if use_native else native.disabled():
        tx = opt.transform(phi, learning_rate=1e-3)
        init, update = tx.init, tx.update
        for _ in lead:
            init, update = jax.vmap(init), jax.vmap(update)
        step = jax.jit(lambda g, s, p: update(g, s, p))
        params = star_params(lead)
        state = init(params)
        outputs = []
        for g in star_grads(lead):
            delta, state = step(g, state, params)
            params = jax.tree.map(lambda p, d: p + d, params, delta)
            outputs.append(jax.tree.map(np.asarray, (delta, state)))
    return outputs


@pytest.mark.parametrize("lead", [(), (3,), (2, 2)], ids=["single", "population", "nested"])
def test_the_star_kernel_equals_the_jax_update(lead):
    from optim4rl.optimizers import STAR
    opt = STAR()
    assert native.star_supported(opt)
    phi = perturbed_phi(opt, scale=0.1)
    fused = star_steps(opt, phi, lead, use_native=True)
    plain = star_steps(opt, phi, lead, use_native=False)
    for step, (a, b) in enumerate(zip(fused, plain)):
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            if x.dtype == np.int32:  # the step count
                np.testing.assert_array_equal(x, y)
                continue
            scale = float(np.abs(y).max()) if y.size else 0.0
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6 * scale + 1e-30,
                                       err_msg=f"step {step} {jax.tree_util.keystr(path)}")
    assert np.any(fused[-1][0]["c"] != 0.0)


def test_star_meta_gradients_through_the_kernel_equal_the_jax_ones():
    from optim4rl.optimizers import STAR
    opt = STAR()
    phi = perturbed_phi(opt, scale=0.1)

    def meta_loss(phi):
        tx = opt.transform(phi, 1e-2)
        params = star_params((2,))
        state = jax.vmap(tx.init)(params)
        for g in star_grads((2,), steps=3):
            g = jax.tree.map(lambda g, p: g + 0.1 * p, g, params)  # gradients that follow the params
            delta, state = jax.vmap(tx.update)(g, state, params)
            params = jax.tree.map(lambda p, d: p + d, params, delta)
        return sum(jnp.sum(jnp.square(p - 0.5)) for p in jax.tree.leaves(params))

    ga = jax.jit(jax.grad(meta_loss))(phi)
    with native.disabled():
        gb = jax.jit(jax.grad(meta_loss))(phi)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(ga), jax.tree.leaves(gb)):
        y = np.asarray(y)
        assert np.abs(y).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-4, atol=1e-5 * float(np.abs(y).max()),
                                   err_msg=jax.tree_util.keystr(path))


def test_the_star_kernel_is_traced_into_the_update_and_other_sizes_run_as_jax():
    from optim4rl.optimizers import STAR
    params = {"w": jnp.ones((100,))}

    def text(opt):
        tx = opt.transform(opt.init_meta(jax.random.key(0)), 1e-3)
        return jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(params, tx.init(params), params).as_text()

    assert native.STAR_TARGET in text(STAR())
    for other in (STAR(hidden_size=8), STAR(hidden_layers=1), STAR(momentum_decays=(0.9, 0.99),
                                                                   adafactor_decays=(0.9, 0.99))):
        assert not native.star_supported(other)
        assert native.STAR_TARGET not in text(other)
    with native.disabled():
        assert native.STAR_TARGET not in text(STAR())


def test_a_non_finite_gradient_makes_its_tensors_star_update_non_finite_as_in_jax():
    # STAR normalises each feature over its tensor: a nan gradient makes that whole tensor's
    # update nan (in JAX and in the kernel alike); the other tensors stay finite.
    from optim4rl.optimizers import STAR
    opt = STAR()
    params = {"a": jnp.ones((40,)), "b": jnp.ones((20,))}
    grads = {"a": jnp.full((40,), 1e-3).at[7].set(jnp.nan), "b": jnp.full((20,), 1e-3)}
    for use_native in (True, False):
        with contextlib.nullcontext() if use_native else native.disabled():
            tx = opt.transform(opt.init_meta(jax.random.key(0)), 1e-3)
            delta, _ = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, tx.init(params), params)
        assert np.isnan(np.asarray(delta["a"])).all(), use_native
        assert np.isfinite(np.asarray(delta["b"])).all(), use_native


def test_the_kernels_flush_denormals_as_xla_does():
    # XLA's CPU code flushes denormal results to zero; so do the kernels, on every thread (else a
    # number would depend on which thread ran its chunk). STAR's second moment of a 1e-20
    # gradient, 1e-3 · 1e-40, is denormal: zero in both.
    from optim4rl.optimizers import STAR
    opt = STAR()
    params = {"w": jnp.ones((50_000,))}
    grads = {"w": jnp.full((50_000,), 1e-20)}
    for use_native in (True, False):
        with contextlib.nullcontext() if use_native else native.disabled():
            tx = opt.transform(opt.init_meta(jax.random.key(0)), 1e-3)
            _, state = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, tx.init(params), params)
        assert not np.any(np.asarray(state.rms)), use_native
