"""The learned-optimizer architectures as plain configs: fields, defaults, checks, tensor shapes.

These mirror the frozen dataclasses of :mod:`optim4rl.optimizers` (``Optim4RL``, ``L2L``, ``Lin``,
``STAR``) field for field, so that a ``.o4r`` file can be checked and run without importing JAX;
tests/test_torch.py keeps the two in step.
"""

from __future__ import annotations

import numbers
from typing import Any

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "optim4rl": {"hidden_size": 8, "head_sizes": (16, 16), "inputs": "sign_log",
                 "log_eps": 1e-18, "eps": 1e-8, "log_scale": 1.0, "sign_flip": False,
                 "sign_bias": 1.0},
    "l2l": {"hidden_size": 8, "head_sizes": (16, 16), "p": 10.0, "eps": 1e-8},
    "lin": {"hidden_size": 8, "head_sizes": (16, 16)},
    "star": {"hidden_size": 4, "hidden_layers": 2, "momentum_decays": (0.9, 0.99, 0.999),
             "rms_decays": (0.999,), "adafactor_decays": (0.9, 0.99, 0.999), "exp_mult": 0.001,
             "nominal_stepsize": 1e-3},
}

# Time scales of STAR's tanh step-count embedding (learned_optimization's ``tanh_embedding``).
STEP_TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


def check_config(architecture: str, config: dict[str, Any]) -> dict[str, Any]:
    """The full config (defaults for missing fields) or ``ValueError`` naming the bad field."""
    defaults = ARCHITECTURES[architecture]
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {architecture} option(s) {unknown}; known: {sorted(defaults)}")
    full = dict(defaults)
    for key, value in config.items():
        default = defaults[key]
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{key} must be a list of numbers, got {value!r}")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be true or false, got {value!r}")
        elif isinstance(default, float):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{key} must be a number, got {value!r}")
            value = float(value)
        elif isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        full[key] = value

    def positive(*names):
        for name in names:
            if full[name] <= 0:
                raise ValueError(f"{name} must be a positive number, got {full[name]!r}")

    if architecture == "optim4rl":
        if full["inputs"] not in ("sign_log", "raw"):
            raise ValueError(f"inputs must be one of ['sign_log', 'raw'], got {full['inputs']!r}")
        positive("hidden_size", "log_eps", "eps", "log_scale")
    elif architecture == "l2l":
        positive("hidden_size", "p", "eps")
    elif architecture == "lin":
        positive("hidden_size")
    else:
        positive("hidden_size")
        if full["hidden_layers"] < 0:
            raise ValueError(f"hidden_layers must be a non-negative integer, "
                             f"got {full['hidden_layers']!r}")
        n_m = len(full["momentum_decays"])
        if n_m < 1:
            raise ValueError("momentum_decays must not be empty")
        if len(full["rms_decays"]) not in (1, n_m):
            raise ValueError("rms_decays must have one entry or as many as momentum_decays")
        if len(full["adafactor_decays"]) != n_m:
            raise ValueError("adafactor_decays must have as many entries as momentum_decays")
    if any(size <= 0 for size in full.get("head_sizes", ())):
        raise ValueError(f"head_sizes must be positive, got {list(full['head_sizes'])}")
    return full


def star_num_features(config: dict[str, Any]) -> int:
    """STAR's per-coordinate inputs before the step embedding (28 with the default decays)."""
    n_m, n_r = len(config["momentum_decays"]), len(config["rms_decays"])
    n_f = len(config["adafactor_decays"])
    return 2 + 2 * n_m + 2 * n_r + 5 * n_f + n_m


def meta_shapes(architecture: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{"gru_m/wi": (2, 24), ...}``: every tensor of φ, as the JAX classes' ``meta_shapes``."""
    def gru(prefix, in_size, hidden):
        return {f"{prefix}/wi": (in_size, 3 * hidden), f"{prefix}/wh": (hidden, 3 * hidden),
                f"{prefix}/b": (3 * hidden,), f"{prefix}/bhn": (hidden,)}

    def mlp(prefix, sizes):
        shapes = {}
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes[f"{prefix}/dense{i}/w"] = (fan_in, fan_out)
            shapes[f"{prefix}/dense{i}/b"] = (fan_out,)
        return shapes

    if architecture == "star":
        hidden = [config["hidden_size"]] * config["hidden_layers"]
        return {"momentum_decay_shift": (len(config["momentum_decays"]),),
                "rms_decay_shift": (len(config["rms_decays"]),),
                "adafactor_decay_shift": (len(config["adafactor_decays"]),),
                **mlp("mlp", [star_num_features(config) + len(STEP_TIMESCALES), *hidden, 2])}
    hidden, heads = config["hidden_size"], list(config["head_sizes"])
    if architecture == "optim4rl":
        return {**gru("gru_m", 2 if config["inputs"] == "sign_log" else 1, hidden),
                **mlp("head_m", [hidden, *heads, 2 if config["sign_flip"] else 1]),
                **gru("gru_v", 1, hidden),
                **mlp("head_v", [hidden, *heads, 1])}
    if architecture == "l2l":
        return {**gru("gru", 2, hidden), **mlp("head", [hidden, *heads, 1])}
    return {**gru("gru", 1, hidden), **mlp("head", [hidden, *heads, 3])}


def state_sizes(architecture: str, config: dict[str, Any]) -> dict[str, int]:
    """Per-coordinate state tensors and their leading size: ``{"hidden_m": 8, "hidden_v": 8}``."""
    if architecture == "optim4rl":
        return {"hidden_m": config["hidden_size"], "hidden_v": config["hidden_size"]}
    if architecture == "star":
        return {"momentum": len(config["momentum_decays"]), "rms": len(config["rms_decays"]),
                "adafactor": len(config["adafactor_decays"])}
    return {"hidden": config["hidden_size"]}
