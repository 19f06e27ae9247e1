"""What every benchmark records beside its figures: the machine, its load and the versions."""

from __future__ import annotations

import json
import os
import pathlib
import platform


def machine_info() -> dict:
    import jax

    import optim4rl

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.processor() or platform.machine(),
        "jax_version": jax.__version__,
        "optim4rl_version": optim4rl.__version__,
    }


def write_report(path: pathlib.Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
