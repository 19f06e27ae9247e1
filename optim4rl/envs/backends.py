"""Imports of the optional simulator libraries (Brax, gymnax), each failure as one clear line.

Both are declared dependencies, but a broken or partial install (a missing transitive
dependency, say) should name the package to install rather than end in a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from types import ModuleType

from optim4rl.errors import ConfigError

_PIP_NAMES = {"brax": "brax", "gymnax": "gymnax"}


def import_backend(module: str) -> ModuleType:
    """``importlib.import_module(module)`` for a module of Brax or gymnax.

    MuJoCo's MJX prints "Failed to import warp" to stdout when the optional NVIDIA Warp package
    is absent (it is only used on GPUs); that print is swallowed so that stdout carries only
    optim4rl's own output.
    """
    top = module.split(".")[0]
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Brax System", category=UserWarning)
            return importlib.import_module(module)
    except ImportError as exc:
        missing = (getattr(exc, "name", None) or top).split(".")[0]
        if missing == top:
            hint = f"install it with: pip install {_PIP_NAMES.get(top, top)}"
        else:
            hint = f"it imports '{missing}', which is not installed: pip install {missing}"
        raise ConfigError(f"{top} tasks need the package '{_PIP_NAMES.get(top, top)}'; {hint}") from None
