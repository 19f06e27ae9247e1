"""Analysis: statistics for comparing optimizers, agent-gradient analysis, the identity experiment,
and plots (the only module that draws; it imports matplotlib lazily).

`identity` needs JAX/flax and is imported on first use: `optim4rl.analysis.identity`.
"""

from __future__ import annotations

import importlib
from typing import Any

from optim4rl.analysis import gradients, plots, stats

__all__ = ["gradients", "identity", "plots", "stats"]


def __getattr__(name: str) -> Any:
    if name == "identity":
        return importlib.import_module("optim4rl.analysis.identity")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
