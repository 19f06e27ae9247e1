"""What every benchmark records beside its figures: the machine, its load and the versions."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager


def machine_info() -> dict:
    import jax

    import optim4rl
    from optim4rl.optimizers import native

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.processor() or platform.machine(),
        "jax_version": jax.__version__,
        "optim4rl_version": optim4rl.__version__,
        # Whether Optim4RL's network ran through the fused CPU kernel ("native") or as JAX.
        "optim4rl_native": native.status(),
    }


def timed_runs(fn, args, repeats: int, warmup: int = 5) -> list[float]:
    """Seconds of each of ``repeats`` calls ``fn(*args)`` (each ended by ``block_until_ready``),
    after ``warmup`` untimed calls. ``fn`` is already jitted or compiled."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has uncommitted changes), if it is one."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_report(path: pathlib.Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


@contextmanager
def watchdog(seconds: float, what: str):
    """Ends the process with exit status 124 and one line if the block takes longer than
    ``seconds``: XLA's CPU runtime occasionally never finishes a program (docs/known_problems.md),
    and a benchmark should then fail fast rather than hold the machine."""
    def expire():
        print(f"benchmark: error: {what} did not finish within {seconds:g} s (XLA's CPU runtime "
              "sometimes never finishes a program: docs/known_problems.md); rerun it", file=sys.stderr, flush=True)
        os._exit(124)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
