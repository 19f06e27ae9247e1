"""The coordinate-wise networks of the learned optimizers in PyTorch, on flat float32 columns.

Every function computes the same thing as its JAX counterpart in :mod:`optim4rl.optimizers`
(gru_optimizers.py, star.py, nets.py), in the same feature-major layout ``[features, N]``: all
``N`` coordinates of a parameter group form one batch, the long coordinate axis is the contiguous
one, so each gate slice is a block of whole rows, and every layer is a single matmul. The
expressions keep the JAX code's order of operations where float32 rounding could differ; the
temporaries are updated in place, since eager PyTorch would otherwise allocate a fresh
``[features, N]`` array for every elementwise operation.

``phi`` maps the ``.o4r`` tensor names (``"gru_m/wi"``) to float32 tensors on the device of the
columns.
"""

from __future__ import annotations

import math

import torch

from optim4rl.torch.architectures import STEP_TIMESCALES, star_num_features

Tensor = torch.Tensor


def dense(phi: dict, prefix: str, x: Tensor) -> Tensor:
    """Affine layer ``[in, N] -> [out, N]``: ``(xᵀW)ᵀ + b``, the bias added after the product."""
    return torch.addmm(phi[f"{prefix}/b"][:, None], phi[f"{prefix}/w"].T, x)


def mlp(phi: dict, prefix: str, x: Tensor, num_layers: int) -> Tensor:
    """ReLU between the layers ``prefix/dense0 ... dense{num_layers-1}``, linear output."""
    for i in range(num_layers):
        x = dense(phi, f"{prefix}/dense{i}", x)
        if i < num_layers - 1:
            x.relu_()
    return x


def gru(phi: dict, prefix: str, h: Tensor, x: Tensor) -> Tensor:
    """One step of the flax GRU cell, gates stacked (reset r, update z, candidate n).

    ``r = σ(Wir x + bir + Whr h)``, ``z = σ(Wiz x + biz + Whz h)``,
    ``n = tanh(Win x + bin + r ⊙ (Whn h + bhn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``.
    """
    hidden = h.shape[0]
    wh, bhn = phi[f"{prefix}/wh"], phi[f"{prefix}/bhn"]
    inputs = torch.addmm(phi[f"{prefix}/b"][:, None], phi[f"{prefix}/wi"].T, x)
    # bhn joins the candidate rows of the recurrent product (r and z get an exact + 0): it sits
    # inside r ⊙ (...), so it cannot be merged into the input-side bias.
    recurrent_bias = torch.cat([bhn.new_zeros(2 * hidden), bhn])
    recurrent = torch.addmm(recurrent_bias[:, None], wh.T, h)
    gates = inputs[:2 * hidden].add_(recurrent[:2 * hidden]).sigmoid_()
    reset, update = gates[:hidden], gates[hidden:]
    candidate = recurrent[2 * hidden:].mul_(reset).add_(inputs[2 * hidden:]).tanh_()
    # (1 − z) ⊙ n + z ⊙ h, computed as in the JAX code rather than as a lerp.
    return torch.addcmul((1.0 - update).mul_(candidate), update, h)


def optim4rl_direction(phi: dict, config: dict, grads: Tensor, hidden_m: Tensor,
                       hidden_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Optim4RL (Lan et al. 2023, arXiv 2302.01470, §4): ``m / sqrt(v + eps)`` and the new states.

    ``m = sign(g) · exp(o1)`` and ``v = exp(o2)``, with ``o1`` from GRU-1 on the processed gradient
    and ``o2`` from GRU-2 on the processed squared gradient; the update is ``−α`` times this.
    """
    if config["inputs"] == "raw":
        inputs_m, inputs_v = grads[None], torch.square(grads)[None]
    else:
        # (sign g, log(|g| + ε)) loses no information but brings gradients spanning many orders of
        # magnitude to inputs of order 1-100; log(g²) = 2·log|g| avoids squaring tiny gradients.
        log_abs = grads.abs().add_(config["log_eps"]).log_().mul_(config["log_scale"])
        inputs_m = torch.stack([torch.sign(grads), log_abs])
        inputs_v = (2.0 * log_abs)[None]
    num_layers = len(config["head_sizes"]) + 1
    hidden_m = gru(phi, "gru_m", hidden_m, inputs_m)
    hidden_v = gru(phi, "gru_v", hidden_v, inputs_v)
    out_m = mlp(phi, "head_m", hidden_m, num_layers)
    o2 = mlp(phi, "head_v", hidden_v, num_layers)[0]
    if config["sign_flip"]:
        # The reference code's learned sign: ±1 in the forward pass (straight-through in JAX).
        soft = torch.tanh(out_m[0] + config["sign_bias"])
        hard = torch.where(soft >= 0.0, 1.0, -1.0)
        m = (soft + (hard - soft)).mul_(torch.sign(grads)).mul_(out_m[1].exp())
    else:
        m = torch.sign(grads).mul_(out_m[0].exp())
    return m.mul_(o2.exp_().add_(config["eps"]).rsqrt_()), hidden_m, hidden_v


def l2l_features(grads: Tensor, p: float, eps: float) -> Tensor:
    """Andrychowicz et al. (2016): ``(log|g|/p, sign g)`` if ``|g| ≥ e^-p`` else ``(−1, e^p·g)``."""
    scaled_log = grads.abs().add_(eps).log_().div_(p)
    large = scaled_log >= -1.0
    first = torch.where(large, scaled_log, -1.0)
    exp_p = torch.exp(torch.tensor(p, dtype=torch.float32)).item()
    second = torch.where(large, torch.sign(grads), grads * exp_p)
    return torch.stack([first, second])


def l2l_direction(phi: dict, config: dict, grads: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """L2L: ``exp(o) · g`` from one GRU on the log/sign preprocessing (update ``−α`` times it)."""
    hidden = gru(phi, "gru", hidden, l2l_features(grads, config["p"], config["eps"]))
    o = mlp(phi, "head", hidden, len(config["head_sizes"]) + 1)[0]
    return o.exp_().mul_(grads), hidden


def lin_direction(phi: dict, config: dict, grads: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Lin: ``exp(o1) · g + exp(o2) · o3`` from one GRU on the raw gradient."""
    hidden = gru(phi, "gru", hidden, grads[None])
    out = mlp(phi, "head", hidden, len(config["head_sizes"]) + 1)
    return torch.addcmul(out[0].exp().mul_(grads), out[1].exp(), out[2]), hidden


def _learned_decay(initial: tuple[float, ...], shift: Tensor) -> Tensor:
    # learned_optimization's parametrisation of a decay: 1 − (1 − β0) · exp(10 · shift).
    one_minus = 1.0 - torch.tensor(initial, dtype=torch.float32, device=shift.device)
    return 1.0 - one_minus * torch.exp(10.0 * shift)


def star_update(phi: dict, config: dict, grads: Tensor, params: Tensor, momentum: Tensor,
                rms: Tensor, adafactor: Tensor, steps: Tensor, sizes: Tensor,
                learning_rate) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """STAR (Harrison et al. 2022) as configured by the Optim4RL reference code: ``(Δθ, states)``.

    ``sizes`` ``[T]`` (int64, on the device) are the coordinates of each tensor of the group in
    order and ``steps`` ``[T]`` their update counts: the features are normalised per tensor and
    the step embedding enters per tensor, through one segmented reduction and one gather instead
    of a loop over tensors.
    """
    g = grads[None]
    g_square = g * g
    decay_m = _learned_decay(config["momentum_decays"], phi["momentum_decay_shift"])[:, None]
    # As in learned_optimization, only the second-moment decays are clipped to [0, 1].
    decay_r = _learned_decay(config["rms_decays"], phi["rms_decay_shift"]).clamp(0.0, 1.0)[:, None]
    decay_f = _learned_decay(config["adafactor_decays"],
                             phi["adafactor_decay_shift"]).clamp(0.0, 1.0)[:, None]
    momentum = decay_m * momentum + (1.0 - decay_m) * g
    rms = decay_r * rms + (1.0 - decay_r) * g_square
    adafactor = decay_f * adafactor + (1.0 - decay_f) * (g_square + 1e-30)

    rsqrt_rms = torch.rsqrt(rms + 1e-6)
    rsqrt_adafactor = torch.rsqrt(adafactor + 1e-8)
    # learned_optimization's feature list for unfactored accumulators, duplicates included.
    features = torch.cat([
        g, params[None], momentum, rms, momentum * rsqrt_rms, rsqrt_rms,
        g * torch.rsqrt(torch.clamp_min(adafactor + 1e-9, 1e-9)),
        adafactor, adafactor, rsqrt_adafactor, rsqrt_adafactor,
        momentum * torch.rsqrt(adafactor + 1e-6),  # JAX writes ** -0.5: equal up to rounding
    ])
    # Each feature is divided by its root mean square over the coordinates of its tensor. The
    # squares are float32, as in JAX; their sums run in float64, since a float32 running sum over
    # a large tensor would drift from JAX's tree sum by more than the tolerance of the tests.
    lengths = sizes.expand(features.shape[0], -1)
    sums = torch.segment_reduce((features * features).double(), "sum", lengths=lengths, axis=1)
    scale = torch.rsqrt(1e-5 + (sums / sizes).float())
    features.mul_(torch.repeat_interleave(scale, sizes, dim=1, output_size=features.shape[1]))

    num_features = star_num_features(config)
    first_w, first_b = phi["mlp/dense0/w"], phi["mlp/dense0/b"]
    timescales = torch.tensor(STEP_TIMESCALES, dtype=torch.float32, device=grads.device)
    embedding = torch.tanh(steps.float()[:, None] / timescales - 1.0)  # [T, 11]
    # The embedding is the same for all coordinates of a tensor: one bias per tensor.
    bias = torch.addmm(first_b, embedding, first_w[num_features:])  # [T, hidden]
    bias = torch.repeat_interleave(bias.T, sizes, dim=1, output_size=features.shape[1])
    x = torch.addmm(bias, first_w[:num_features].T, features)
    num_layers = config["hidden_layers"] + 1
    for i in range(1, num_layers):
        x = dense(phi, f"mlp/dense{i}", x.relu_())
    direction, magnitude = x[0], x[1]

    learned_step = direction * torch.exp(config["exp_mult"] * magnitude) * learning_rate
    adam = momentum * torch.rsqrt(rms + 1e-6)
    nominal = config["nominal_stepsize"] * math.exp(config["exp_mult"])
    delta = (learned_step + nominal * adam.mean(dim=0)).neg_()
    return delta, momentum, rms, adafactor
