"""optim4rl: learned optimizers for reinforcement learning (Optim4RL, arXiv 2302.01470), in JAX.

``import optim4rl`` is light and never fails: the sub-packages (and JAX with them) are imported
on first use, e.g. ``optim4rl.optimizers`` or ``optim4rl.make_optimizer("adam", 3e-4)``.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = ("optimizers", "envs", "agents", "meta", "analysis", "errors")

__all__ = ["__version__", "optimizers", "envs", "agents", "make_optimizer"]


def make_optimizer(spec: str, learning_rate: Any, grad_clip: Any = None, global_clip: Any = None,
                   **kwargs: Any):
    """Build an optax transformation from a name; see :func:`optim4rl.optimizers.make_optimizer`."""
    from optim4rl.optimizers import make_optimizer as _make_optimizer

    return _make_optimizer(spec, learning_rate, grad_clip=grad_clip, global_clip=global_clip,
                           **kwargs)


def __getattr__(name: str) -> Any:
    # PEP 562: sub-packages load lazily so that a broken or unfinished one never breaks the rest.
    if name in _SUBPACKAGES:
        module = importlib.import_module(f"optim4rl.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'optim4rl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SUBPACKAGES))
