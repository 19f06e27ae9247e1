"""Optim4RL, L2L, Lin and STAR as ``torch.optim.Optimizer`` subclasses, reading ``.o4r`` files.

The JAX optimizers of :mod:`optim4rl.optimizers` with the same meta-parameters φ give the same
updates (tests/test_torch.py compares them over 50-step gradient streams). Each parameter group
runs its network once per step on all its coordinates: the gradients are concatenated into one
flat float32 vector, and the recurrent states live in one ``[features, N]`` buffer per group
whose per-parameter slices are what ``optimizer.state[p]`` shows (and ``state_dict`` saves).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable

import torch

from optim4rl.errors import ConfigError, ParameterFileError
from optim4rl.torch import networks
from optim4rl.torch.architectures import ARCHITECTURES, check_config, state_sizes
from optim4rl.torch.files import O4RFile, read, resolve

Tensor = torch.Tensor


def _check_lr(lr: Any) -> float:
    try:
        value = float(lr)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"lr must be a positive number, got {lr!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    return value


def _check_grad_clip(grad_clip: Any) -> None:
    if grad_clip is None:
        return
    try:
        value = float(grad_clip)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"grad_clip must be a number or None, got {grad_clip!r}") from None
    if math.isnan(value):
        raise ConfigError(f"grad_clip must be a number or None, got {grad_clip!r}")


class _GroupBuffers:
    """The flat state of the parameters of one group on one device, and the views handed out."""

    def __init__(self, params: list[Tensor], buffers: dict[str, Tensor], views: dict):
        self.params = params
        self.buffers = buffers
        self.views = views  # name -> [view of buffers[name] per parameter]

    def matches(self, params: list[Tensor], state: dict) -> bool:
        """Still in charge: the same parameters, and their state holds our views (not a tensor a
        user or ``load_state_dict`` has put there)."""
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            return False
        return all(state[p].get(name) is views[i]
                   for name, views in self.views.items() for i, p in enumerate(params))


class LearnedOptimizer(torch.optim.Optimizer):
    """Base class: a learned optimizer whose architecture and φ come from a ``.o4r`` file.

    Args:
      params: an iterable of parameters or of parameter-group dicts, as for any torch optimizer.
      lr: step size α (the JAX ``learning_rate``); per group, and LR schedulers may change it.
      file: where φ comes from: ``"ARCH:NAME"`` for a shipped pretrained file
        (``optim4rl.torch.pretrained_names()``), ``"ARCH:PATH.o4r"`` or a path for a file of your
        own (``optim4rl meta-train`` or ``optim4rl imitate`` writes them), or ``"ARCH:init"`` for
        the untrained φ of ``optim4rl.make_optimizer("ARCH:init", ...)`` (seed 0; JAX draws it,
        so only this source imports JAX).
      grad_clip: elementwise gradient clip before the network (``None`` or ≤ 0: off), per group.
      **architecture: architecture fields (``inputs="raw", head_sizes=()``), only with
        ``"ARCH:init"``; a file fixes its own architecture.

    The state of each parameter ``p`` is ``{"step", NAME: [features, *p.shape], ...}`` (float32,
    on ``p``'s device); ``optimizer.state.clear()`` restarts every recurrent state at zero, as
    when an agent is re-initialised. Parameters of any floating dtype are updated; the network
    and the states are float32, as in JAX.
    """

    architecture: str = ""
    default_file: str = ""

    def __init__(self, params: Iterable, lr: float = 1e-3, file: str | os.PathLike | None = None,
                 grad_clip: float | None = None, **architecture: Any):
        _check_lr(lr)
        _check_grad_clip(grad_clip)
        loaded = _load(self.architecture, file or self.default_file, architecture)
        self.file = loaded.path
        self.config = loaded.config
        self.info = loaded.info
        self.phi_sha256 = loaded.sha256
        self._phi_cpu = {name: torch.from_numpy(array.copy())
                         for name, array in loaded.tensors.items()}
        self._init_caches()
        super().__init__(params, {"lr": lr, "grad_clip": grad_clip})

    def _init_caches(self) -> None:
        self._phi_on: dict[torch.device, dict[str, Tensor]] = {}
        self._buffers: dict[tuple[int, torch.device], _GroupBuffers] = {}
        self._state_sizes = state_sizes(self.architecture, self.config)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key]
                      for key in ("file", "config", "info", "phi_sha256", "_phi_cpu")})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_caches()

    def __repr__(self) -> str:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return f"{type(self).__name__}(file={self.file!r}, config={self.config}, groups={groups})"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_lr(param_group.get("lr", self.defaults["lr"]))
        _check_grad_clip(param_group.get("grad_clip", self.defaults["grad_clip"]))
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype; the recurrent states stay float32
        # (a bfloat16 copy would lose them), as the optimizer computes them.
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for name in self._state_sizes:
                if name in saved:
                    self.state[p][name] = saved[name].to(device=p.device, dtype=torch.float32)

    def _phi(self, device: torch.device) -> dict[str, Tensor]:
        if device not in self._phi_on:
            self._phi_on[device] = {k: v.to(device) for k, v in self._phi_cpu.items()}
        return self._phi_on[device]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            by_device: dict[torch.device, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                if p.grad.is_sparse:
                    raise ConfigError(f"{type(self).__name__} does not support sparse gradients")
                if not p.is_floating_point():
                    raise ConfigError(f"{type(self).__name__} updates floating-point parameters, "
                                      f"got {p.dtype}")
                by_device.setdefault(p.device, []).append(p)
            for device, params in by_device.items():
                self._step_params(index, device, group, params)
        return loss

    def _step_params(self, index: int, device: torch.device, group: dict,
                     params: list[Tensor]) -> None:
        grads = torch.cat([p.grad.reshape(-1) for p in params]).to(torch.float32)
        grad_clip = group["grad_clip"]
        if grad_clip is not None and grad_clip > 0:
            grads.clamp_(-grad_clip, grad_clip)
        lr = group["lr"]
        if isinstance(lr, Tensor):
            lr = lr.to(device=device, dtype=torch.float32)
        buffers = self._flat_state((index, device), params)
        steps = [self.state[p]["step"] for p in params]
        delta, new_buffers = self._update(self._phi(device), grads, buffers, params, steps, lr)
        torch._foreach_add_(steps, 1.0)

        sizes = [p.numel() for p in params]
        views = {name: [chunk.view(chunk.shape[0], *p.shape)
                        for chunk, p in zip(buffer.split(sizes, dim=1), params)]
                 for name, buffer in new_buffers.items()}
        for name, name_views in views.items():
            for p, view in zip(params, name_views):
                self.state[p][name] = view
        self._buffers[(index, device)] = _GroupBuffers(list(params), new_buffers, views)
        updates = [chunk.view_as(p) for chunk, p in zip(delta.split(sizes), params)]
        if all(p.dtype == torch.float32 for p in params):
            torch._foreach_add_(params, updates)
        else:
            for p, update in zip(params, updates):
                p.add_(update.to(p.dtype))

    def _flat_state(self, key: tuple, params: list[Tensor]) -> dict[str, Tensor]:
        """The group's state as ``{name: [features, N]}``, rebuilt from ``self.state`` only when
        something other than the last step has changed it."""
        cached = self._buffers.get(key)
        if cached is not None and cached.matches(params, self.state):
            return cached.buffers
        columns: dict[str, list[Tensor]] = {name: [] for name in self._state_sizes}
        for i, p in enumerate(params):
            state = self.state[p]
            state.setdefault("step", torch.tensor(0.0))
            for name, size in self._state_sizes.items():
                value = state.get(name)
                if value is None:
                    value = torch.zeros((size, *p.shape), dtype=torch.float32, device=p.device)
                    state[name] = value
                if tuple(value.shape) != (size, *p.shape):
                    raise ConfigError(f"state '{name}' of parameter {i} has shape "
                                      f"{list(value.shape)}, expected {[size, *p.shape]}: was it "
                                      f"saved by another optimizer?")
                columns[name].append(value.reshape(size, -1).to(p.device, torch.float32))
        return {name: torch.cat(parts, dim=1) for name, parts in columns.items()}

    def _update(self, phi, grads, buffers, params, steps, lr) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError


class Optim4RL(LearnedOptimizer):
    """Optim4RL (Lan et al., "Learning to Optimize for Reinforcement Learning", arXiv 2302.01470).

    Two GRUs per coordinate read the processed gradient and squared gradient; the update is
    ``Δθ = −α · sign(g)·exp(o1) / sqrt(exp(o2) + ε)``, Adam's form with learned moments. The
    default file is ``"optim4rl:grid6"``, meta-trained on six gridworlds. See
    :class:`LearnedOptimizer` for the arguments.
    """

    architecture = "optim4rl"
    default_file = "optim4rl:grid6"

    def _update(self, phi, grads, buffers, params, steps, lr):
        direction, hidden_m, hidden_v = networks.optim4rl_direction(
            phi, self.config, grads, buffers["hidden_m"], buffers["hidden_v"])
        return direction.mul_(-lr), {"hidden_m": hidden_m, "hidden_v": hidden_v}


class L2L(LearnedOptimizer):
    """L2L baseline (Andrychowicz et al. 2016): ``Δθ = −α · exp(o) · g`` from one GRU on the
    log/sign preprocessing. Default file ``"l2l:l2l-big_dense_long"``."""

    architecture = "l2l"
    default_file = "l2l:l2l-big_dense_long"

    def _update(self, phi, grads, buffers, params, steps, lr):
        direction, hidden = networks.l2l_direction(phi, self.config, grads, buffers["hidden"])
        return direction.mul_(-lr), {"hidden": hidden}


class Lin(LearnedOptimizer):
    """Lin baseline: ``Δθ = −α · (exp(o1) · g + exp(o2) · o3)`` from one GRU on the raw gradient.
    Default file ``"lin:lin-big_dense_long"``."""

    architecture = "lin"
    default_file = "lin:lin-big_dense_long"

    def _update(self, phi, grads, buffers, params, steps, lr):
        direction, hidden = networks.lin_direction(phi, self.config, grads, buffers["hidden"])
        return direction.mul_(-lr), {"hidden": hidden}


class STAR(LearnedOptimizer):
    """STAR baseline (Harrison et al. 2022): a per-coordinate MLP on momentum, second-moment,
    parameter and step-count features, added to a nominal Adam-like step. It reads the parameter
    values. Default file ``"star:star-big_dense_long"``."""

    architecture = "star"
    default_file = "star:star-big_dense_long"

    def _update(self, phi, grads, buffers, params, steps, lr):
        flat_params = torch.cat([p.reshape(-1) for p in params]).to(torch.float32)
        device = grads.device
        sizes = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
        counts = torch.stack(steps).to(device)
        delta, momentum, rms, adafactor = networks.star_update(
            phi, self.config, grads, flat_params, buffers["momentum"], buffers["rms"],
            buffers["adafactor"], counts, sizes, lr)
        return delta, {"momentum": momentum, "rms": rms, "adafactor": adafactor}


CLASSES = {"optim4rl": Optim4RL, "l2l": L2L, "lin": Lin, "star": STAR}


def from_file(params: Iterable, file: str | os.PathLike, lr: float = 1e-3,
              grad_clip: float | None = None) -> LearnedOptimizer:
    """The optimizer class the file's architecture names (Optim4RL, L2L, Lin or STAR)."""
    architecture, _ = resolve(file)
    if architecture is None:
        architecture = read(file).architecture
    return CLASSES[architecture](params, lr=lr, file=file, grad_clip=grad_clip)


def _load(architecture: str, file: str | os.PathLike, options: dict[str, Any]) -> O4RFile:
    spec_architecture, source = resolve(file)
    if spec_architecture is not None and spec_architecture != architecture:
        raise ConfigError(f"'{file}' names a {spec_architecture} optimizer: use "
                          f"optim4rl.torch.{CLASSES[spec_architecture].__name__}, or "
                          f"optim4rl.torch.from_file")
    if spec_architecture is not None and source == "init":
        return _untrained(architecture, options)
    if options:
        raise ConfigError(f"the architecture comes from the file; options {sorted(options)} are "
                          f"only allowed with file='{architecture}:init'")
    loaded = read(file)
    if loaded.architecture != architecture:
        raise ParameterFileError(f"{loaded.path}: holds a '{loaded.architecture}' optimizer, not "
                                 f"'{architecture}' (use optim4rl.torch."
                                 f"{CLASSES[loaded.architecture].__name__})")
    return loaded


def _untrained(architecture: str, options: dict[str, Any]) -> O4RFile:
    """The untrained φ of ``make_optimizer("ARCH:init")``: JAX draws it (its PRNG and its
    initialisers cannot be reproduced in torch), so this is the one place JAX is imported."""
    try:
        config = check_config(architecture, options)
    except ValueError as error:
        raise ConfigError(f"bad options for {architecture}: {error}") from None
    try:
        import numpy as np

        from optim4rl.optimizers import learned_from_spec
        from optim4rl.optimizers.base import named_leaves
    except ImportError as error:
        raise ConfigError(f"'{architecture}:init' draws φ with JAX, which failed to import "
                          f"({error}); use a saved .o4r file instead") from None
    opt, phi, info = learned_from_spec(f"{architecture}:init", **options)
    tensors = {name: np.asarray(leaf, dtype=np.float32) for name, leaf in named_leaves(phi)}
    return O4RFile(architecture, config, tensors, info, f"{architecture}:init", "")


assert set(CLASSES) == set(ARCHITECTURES)
