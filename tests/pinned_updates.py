"""A fixed gradient stream and the learned optimizers' answers to it, for tests/test_pinned_updates.py.

Every shipped parameter file (and the fresh initialisation of every architecture) is run for
``STEPS`` updates on a deterministic stream of gradients: a few tensors (one larger than a CPU
cache block, so that the blocked kernel's seams are crossed), magnitudes log-uniform over
1e-8 … 1, random signs, exact zeros (scattered, and one tensor that is always zero). What the
test compares: the updates at a fixed sample of coordinates (all of the small tensors, a stride
through the large one, and the coordinates around its block seams), for one agent and for a
vmapped population of three, and the meta-gradient of a fixed linear function of three updates.

Run as a script to regenerate ``tests/data/pinned_updates.npz``; do that only when the numbers
are *meant* to change, from the code whose numbers are to be pinned.

    python tests/pinned_updates.py
    python tests/pinned_updates.py --add   # pin only a newly shipped file, keep the rest
"""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import optim4rl
from optim4rl import optimizers

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "pinned_updates.npz"
STEPS = 10
LEARNING_RATE = 1e-3
# Flattening order is the sorted key order: always_zero, bias, conv, dense, scalar.
SHAPES = {"always_zero": (5,), "bias": (16,), "conv": (2, 2, 3, 16), "dense": (300, 130),
          "scalar": ()}
AGENT_SCALES = (1.0, 1e-3, 10.0)  # a population of three agents, gradients scaled per agent
META_STEPS = 3


def cases() -> dict[str, tuple[str, dict]]:
    """``{label: (spec, architecture options)}``: every shipped file and every fresh architecture."""
    found = {f"file:{name}": (f"{optimizers.load(_path(name))[0].name}:{name}", {})
             for name in optimizers.list_pretrained()}
    found.update({
        "init:optim4rl": ("optim4rl:init", {}),
        "init:rlc2024": ("optim4rl:init", {"inputs": "raw", "head_sizes": ()}),
        "init:sign_flip": ("optim4rl:init", {"sign_flip": True}),
        "init:l2l": ("l2l:init", {}),
        "init:lin": ("lin:init", {}),
        "init:star": ("star:init", {}),
    })
    return found


def _path(name: str):
    from optim4rl.optimizers.registry import pretrained_path
    return pretrained_path(name)


def gradient_stream() -> tuple[list[dict], list[dict]]:
    """``STEPS`` gradient pytrees and parameter pytrees (NumPy float32, reproducible anywhere)."""
    rng = np.random.RandomState(20260201)
    grads, params = [], []
    for _ in range(STEPS):
        g, p = {}, {}
        for name, shape in SHAPES.items():
            size = int(np.prod(shape, dtype=np.int64))
            magnitude = 10.0 ** rng.uniform(-8.0, 0.0, size)
            sign = rng.choice([-1.0, 1.0], size)
            zero = rng.uniform(size=size) < 0.1
            values = np.where(zero, 0.0, sign * magnitude)
            if name == "always_zero":
                values = np.zeros(size)
            g[name] = values.reshape(shape).astype(np.float32)
            p[name] = rng.normal(0.0, 0.3, size).reshape(shape).astype(np.float32)
        grads.append(g)
        params.append(p)
    return grads, params


def sample_indices() -> np.ndarray:
    """Flat coordinates whose updates are pinned (all small tensors, a stride, the block seams)."""
    n = sum(int(np.prod(s, dtype=np.int64)) for s in SHAPES.values())
    small = np.arange(0, 5 + 16 + 64)
    stride = np.arange(0, n, 131)
    seams = np.concatenate([np.arange(c - 12, c + 12) for c in (n // 4, n // 3, n // 2,
                                                                2 * n // 3, 3 * n // 4)])
    tail = np.arange(n - 24, n)
    return np.unique(np.concatenate([small, stride, seams, tail]))


def _tx(spec: str, options: dict):
    return optim4rl.make_optimizer(spec, learning_rate=LEARNING_RATE, **options)


def single_updates(spec: str, options: dict) -> np.ndarray:
    """``[STEPS, samples]``: one agent's updates on the stream."""
    tx = _tx(spec, options)
    grads, params = gradient_stream()
    update = jax.jit(tx.update)
    state = tx.init(params[0])
    index = sample_indices()
    rows = []
    for g, p in zip(grads, params):
        updates, state = update(g, state, p)
        rows.append(np.asarray(ravel_pytree(updates)[0])[index])
    return np.stack(rows)


def population_updates(spec: str, options: dict) -> np.ndarray:
    """``[STEPS, agents, samples]``: a vmapped population of agents (gradients scaled per agent)."""
    tx = _tx(spec, options)
    grads, params = gradient_stream()
    scales = np.asarray(AGENT_SCALES, np.float32)

    def stacked(tree, scale):
        return jax.tree.map(lambda x: (scale.reshape((-1,) + (1,) * x.ndim) * x[None]), tree)

    update = jax.jit(jax.vmap(tx.update))
    state = jax.vmap(tx.init)(stacked(params[0], np.ones_like(scales)))
    index = sample_indices()
    rows = []
    for g, p in zip(grads, params):
        updates, state = update(stacked(g, scales), state, stacked(p, np.ones_like(scales)))
        flat = jax.vmap(lambda u: ravel_pytree(u)[0])(updates)
        rows.append(np.asarray(flat)[:, index])
    return np.stack(rows)


def meta_gradient(spec: str, options: dict, population: bool) -> dict[str, np.ndarray]:
    """Gradient w.r.t. φ of ``Σ_t <u_t, w>`` over the first ``META_STEPS`` updates."""
    opt, phi, _ = optimizers.learned_from_spec(spec, **options)
    grads, params = gradient_stream()
    weights = np.random.RandomState(7).normal(size=ravel_pytree(grads[0])[0].size)
    weights = weights.astype(np.float32)
    scales = np.asarray(AGENT_SCALES if population else (1.0,), np.float32)

    def loss(phi):
        tx = opt.transform(phi, LEARNING_RATE)

        def one_agent(scale):
            state = tx.init(params[0])
            total = 0.0
            for g, p in zip(grads[:META_STEPS], params[:META_STEPS]):
                updates, state = tx.update(jax.tree.map(lambda x: scale * x, g), state, p)
                total = total + jnp.dot(ravel_pytree(updates)[0], weights)
            return total

        if population:
            return jnp.sum(jax.vmap(one_agent)(jnp.asarray(scales)))
        return one_agent(jnp.float32(1.0))

    gradient = jax.jit(jax.grad(loss))(phi)
    return {name: np.asarray(leaf) for name, leaf in optimizers.base.named_leaves(gradient)}


# The population (vmapped) and meta-gradient paths, for one case of each kernel.
META_CASES = ("file:grid6", "init:rlc2024", "init:l2l", "init:lin", "init:star")


def compute_all() -> dict[str, np.ndarray]:
    arrays = {"sample_indices": sample_indices()}
    for label, (spec, options) in cases().items():
        arrays[f"{label}/single"] = single_updates(spec, options)
    for label in META_CASES:
        spec, options = cases()[label]
        arrays[f"{label}/population"] = population_updates(spec, options)
        for population in (False, True):
            kind = "meta_population" if population else "meta_single"
            for name, value in meta_gradient(spec, options, population).items():
                arrays[f"{label}/{kind}/{name}"] = value
    return arrays


def add_missing() -> dict[str, np.ndarray]:
    """The fixture plus the single-update values of cases it lacks (a newly shipped file); the
    values already pinned are kept as they are."""
    arrays = dict(np.load(FIXTURE))
    for label, (spec, options) in cases().items():
        if f"{label}/single" not in arrays:
            arrays[f"{label}/single"] = single_updates(spec, options)
            print(f"pinned {label}")
    return arrays


def main() -> None:
    # --add: pin only what is missing (run it with the code the other values were pinned with).
    arrays = add_missing() if "--add" in sys.argv[1:] else compute_all()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, **arrays)
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1024:.0f} KiB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main()
