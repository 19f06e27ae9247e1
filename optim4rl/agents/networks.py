"""Agent networks (docs/paper_settings.md §3): every network maps observations to ``(policy_output, value)``.

``policy_output`` parameterises the action distribution (logits, or ``[loc, pre_scale]`` for the
tanh-Gaussian, see ``distributions.py``). Observations may carry any leading batch axes.
Each network also has ``policy`` and ``value`` methods, so a rollout can compute the policy alone
(``network.apply(params, obs, method="policy")``).

- :class:`ActorCritic` — shared torso, linear policy and value heads (the paper's A2C agents):
  Catch: Dense 256 ReLU; small gridworlds: Dense 32 ReLU; big gridworlds: Conv 16 (2×2) ReLU,
  then Dense 32 ReLU; other discrete tasks (gymnax, MinAtar): Dense 64, 64 ReLU.
- :class:`SeparateActorCritic` — independent policy and value MLPs, Brax's PPO defaults for
  continuous control: policy 4×32, value 5×256, swish, lecun-uniform init.

:func:`orthogonal` is flax's orthogonal initializer, bit for bit, made safe to ``vmap`` on a CPU
(PureJaxRL's networks use orthogonal init; see docs/known_problems.md).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from optim4rl.agents.distributions import make_distribution

Array = jax.Array

ACTIVATIONS = {"relu": nn.relu, "swish": nn.swish, "tanh": nn.tanh, "elu": nn.elu, "gelu": nn.gelu}


def orthogonal(scale: float = 1.0, column_axis: int = -1):
    """``flax.linen.initializers.orthogonal(scale)`` with its QR factorisations done one matrix at a
    time under ``vmap``: the same values, bit for bit, and no deadlock on a CPU.

    jaxlib (0.10.2) spreads a batched QR over XLA's CPU thread pool and then blocks the calling
    pool thread until the pieces are done. Two such QRs running at once, e.g. the actor's and the
    critic's 64×64 layers of a network initialised inside a ``vmap`` over seeds, can occupy every
    pool thread of a 2-core machine, and then nothing runs the pieces: the program waits forever
    at 0 % CPU. A QR of one matrix runs inline, so ``sequential_vmap`` (one matrix per call)
    avoids it. Use this as ``kernel_init`` wherever flax's ``orthogonal`` would be vmapped.
    """
    base = nn.initializers.orthogonal(scale, column_axis=column_axis)

    def init(key, shape, dtype=jnp.float32):
        return jax.custom_batching.sequential_vmap(lambda k: base(k, shape, dtype))(key)

    return init


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def _flatten_batch(obs: Array, obs_ndim: int) -> tuple[Array, tuple[int, ...]]:
    """Splits ``obs`` into (observations with one batch axis, the original batch shape)."""
    batch_shape = obs.shape[: obs.ndim - obs_ndim]
    return obs.reshape((-1,) + obs.shape[len(batch_shape) :]), batch_shape


class PatchConv(nn.Module):
    """Stride-1 ``SAME`` convolution written as patches × matmul; same parameters as ``nn.Conv``.

    Numerically it is ``nn.Conv(features, kernel_size)`` (kernel ``[kh, kw, C, F]``, bias ``[F]``,
    the same initialisers). XLA's CPU backend runs a convolution inside a ``lax.scan``/``while``
    body several times slower than the same op outside one (measured 7× for A2C's big-gridworld
    network), and training loops live in scans; a small kernel's patches plus one dense matmul
    avoid the convolution op altogether, on every backend.
    """

    features: int
    kernel_size: tuple[int, int] = (2, 2)

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [B, H, W, C]
        kh, kw = self.kernel_size
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, channels, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        height, width = x.shape[1], x.shape[2]
        # SAME padding as lax.padtype_to_pads: total k - 1 per axis, the smaller half before.
        pad = [(0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)]
        x = jnp.pad(x, pad)
        patches = jnp.concatenate(
            [x[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], axis=-1)
        return patches @ kernel.reshape(kh * kw * channels, self.features) + bias


class ActorCritic(nn.Module):
    """Shared torso (optional one conv layer, then dense layers), linear policy and value heads.

    ``obs_ndim``: number of trailing axes of one observation. ``channels_first``: conv inputs
    arrive as planes ``(C, H, W)`` (our gridworlds) and are moved to flax's ``(H, W, C)``.
    """

    num_outputs: int
    obs_ndim: int
    hidden_sizes: Sequence[int] = (256,)
    conv_features: int = 0
    conv_kernel: tuple[int, int] = (2, 2)
    channels_first: bool = True
    activation: str = "relu"

    def setup(self):
        if self.conv_features:
            self.conv = PatchConv(self.conv_features, tuple(self.conv_kernel))
        self.torso_layers = [nn.Dense(size) for size in self.hidden_sizes]
        self.policy_head = nn.Dense(self.num_outputs)
        self.value_head = nn.Dense(1)

    def torso(self, obs: Array) -> tuple[Array, tuple[int, ...]]:
        act = _activation(self.activation)
        x, batch_shape = _flatten_batch(obs, self.obs_ndim)
        if self.conv_features:
            if self.channels_first:
                x = jnp.moveaxis(x, 1, -1)
            x = act(self.conv(x))
        x = x.reshape((x.shape[0], -1))
        for layer in self.torso_layers:
            x = act(layer(x))
        return x, batch_shape

    def __call__(self, obs: Array) -> tuple[Array, Array]:
        x, batch_shape = self.torso(obs)
        logits = self.policy_head(x).reshape(batch_shape + (self.num_outputs,))
        value = self.value_head(x)[:, 0].reshape(batch_shape)
        return logits, value

    def policy(self, obs: Array) -> Array:
        x, batch_shape = self.torso(obs)
        return self.policy_head(x).reshape(batch_shape + (self.num_outputs,))

    def value(self, obs: Array) -> Array:
        x, batch_shape = self.torso(obs)
        return self.value_head(x)[:, 0].reshape(batch_shape)


class MLP(nn.Module):
    """Dense layers with an activation between them (none after the last), lecun-uniform init."""

    layer_sizes: Sequence[int]
    activation: str = "swish"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = _activation(self.activation)
        for i, size in enumerate(self.layer_sizes):
            x = nn.Dense(size, kernel_init=nn.initializers.lecun_uniform(), name=f"hidden_{i}")(x)
            if i < len(self.layer_sizes) - 1:
                x = act(x)
        return x


class SeparateActorCritic(nn.Module):
    """Policy and value as two independent MLPs on the flattened observation (Brax PPO)."""

    num_outputs: int
    obs_ndim: int
    policy_hidden_sizes: Sequence[int] = (32, 32, 32, 32)
    value_hidden_sizes: Sequence[int] = (256, 256, 256, 256, 256)
    activation: str = "swish"

    def setup(self):
        self.policy_mlp = MLP(tuple(self.policy_hidden_sizes) + (self.num_outputs,), self.activation)
        self.value_mlp = MLP(tuple(self.value_hidden_sizes) + (1,), self.activation)

    def _flat(self, obs: Array) -> tuple[Array, tuple[int, ...]]:
        x, batch_shape = _flatten_batch(obs, self.obs_ndim)
        return x.reshape((x.shape[0], -1)), batch_shape

    def policy(self, obs: Array) -> Array:
        x, batch_shape = self._flat(obs)
        return self.policy_mlp(x).reshape(batch_shape + (self.num_outputs,))

    def value(self, obs: Array) -> Array:
        x, batch_shape = self._flat(obs)
        return self.value_mlp(x)[:, 0].reshape(batch_shape)

    def __call__(self, obs: Array) -> tuple[Array, Array]:
        return self.policy(obs), self.value(obs)


def make_network(env, conv_layout: str = "map") -> nn.Module:
    """The paper's network for ``env`` (docs/paper_settings.md §3), chosen by its name and action space.

    Discrete tasks get a shared-torso :class:`ActorCritic`; continuous tasks get Brax's PPO
    networks (:func:`make_ppo_network`). ``conv_layout="authors"``: the big gridworlds' conv reads
    the (planes, rows, columns) observation as channels-last, as the authors' code does (it
    convolves over plane x row with the columns as channels); the default convolves over the map.
    """
    if not env.discrete:
        return make_ppo_network(env)
    num_outputs = make_distribution(env).param_size
    obs_ndim = len(env.observation_shape)
    name = env.name
    if name == "catch":
        return ActorCritic(num_outputs, obs_ndim, hidden_sizes=(256,))
    if name.startswith("small_"):
        return ActorCritic(num_outputs, obs_ndim, hidden_sizes=(32,))
    if name.startswith("big_"):
        return ActorCritic(num_outputs, obs_ndim, hidden_sizes=(32,), conv_features=16, conv_kernel=(2, 2),
                           channels_first=conv_layout != "authors")
    return ActorCritic(num_outputs, obs_ndim, hidden_sizes=(64, 64))


def make_ppo_network(
    env,
    policy_hidden_sizes: Sequence[int] | None = None,
    value_hidden_sizes: Sequence[int] | None = None,
    activation: str | None = None,
) -> SeparateActorCritic:
    """Separate policy and value MLPs for PPO.

    Continuous tasks: Brax's defaults (policy 4×32, value 5×256, swish). Discrete tasks
    (gymnax, MinAtar): policy 64×64 and value 64×64 with tanh, the PureJaxRL PPO defaults.
    Any argument given overrides the default.
    """
    if env.discrete:
        defaults = ((64, 64), (64, 64), "tanh")
    else:
        defaults = ((32,) * 4, (256,) * 5, "swish")
    return SeparateActorCritic(
        num_outputs=make_distribution(env).param_size,
        obs_ndim=len(env.observation_shape),
        policy_hidden_sizes=tuple(policy_hidden_sizes or defaults[0]),
        value_hidden_sizes=tuple(value_hidden_sizes or defaults[1]),
        activation=activation or defaults[2],
    )


def init_params(network: nn.Module, key: Array, observation_shape: tuple[int, ...]):
    """Initialises ``network`` for observations of ``observation_shape``."""
    return network.init(key, jnp.zeros((1,) + tuple(observation_shape), jnp.float32))
