"""The CPU cache blocking of coordinate-wise networks computes what the plain network computes.

Block sizes are shrunk so that small problems span several blocks, with a last block that
overlaps its neighbour. The fused CPU kernel is turned off: this tests the JAX block loop
(tests/test_native.py compares the kernel with the JAX network).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim4rl.optimizers import base, native

ARCHITECTURES = {"default": {}, "rlc2024": {"inputs": "raw", "head_sizes": ()}}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_blocked_equals_plain_for_populations_and_meta_gradients(name, monkeypatch):
    if jax.default_backend() != "cpu":
        pytest.skip("blocking runs on CPU only")
    from optim4rl.optimizers.gru_optimizers import Optim4RL

    arch = Optim4RL(**ARCHITECTURES[name])
    phi = arch.init_meta(jax.random.key(0))
    agents, n = 3, 203
    grads = 1e-2 * jax.random.normal(jax.random.key(1), (agents, n))
    grads = grads.at[:, ::3].set(0.0)  # exact zeros, as in A2C gradients

    def population_step(phi, grads):
        state = jax.vmap(lambda _: arch.init_state(n))(jnp.arange(agents))

        def one(g, s):
            delta, s = arch.step(phi, g, s, None, jnp.float32(1e-2), (n,))
            delta2, _ = arch.step(phi, 0.5 * g, s, None, jnp.float32(1e-2), (n,))
            return delta + delta2

        return jax.vmap(one)(grads, state)

    def meta_loss(phi):
        return jnp.sum(jnp.sin(100.0 * population_step(phi, grads)))

    def compute():
        with native.disabled():
            update = jax.jit(population_step)(phi, grads)
            single = jax.jit(lambda p, g: arch.step(p, g, arch.init_state(n), None,
                                                    jnp.float32(1e-2), (n,))[0])(phi, grads[0])
            meta_grad = jax.jit(jax.grad(meta_loss))(phi)
        return update, single, meta_grad

    monkeypatch.setattr(base, "CPU_BLOCK_SIZE", 0)
    plain = compute()
    # 3 agents x 203 coordinates: blocks of 64 // 3 = 21 per agent, balanced and rounded to a
    # multiple of 8, the last block overlapping its neighbour.
    monkeypatch.setattr(base, "CPU_BLOCK_SIZE", 64)
    monkeypatch.setattr(base, "MIN_BLOCK_WIDTH", 8)
    width, num_blocks = base._block_layout(n, agents, 64)
    assert num_blocks > 1 and num_blocks * width > n
    blocked = compute()
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(blocked)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)
    assert any(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(plain[2]))
