"""Laying a population (seeds, agents) out over all devices with `jax.sharding`.

The leading axis of every array in a population pytree is split over a 1-D device mesh; jit
then runs each device's share locally and turns means over the population into all-reduces.
The same code therefore runs on 1 CPU, 8 GPUs, or several hosts after `jax.distributed`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "population"


def population_mesh(size: int) -> Mesh | None:
    """A mesh over as many devices as divide `size` (None when only one device would be used)."""
    devices = jax.devices()
    n = len(devices)
    while n > 1 and size % n:
        n -= 1
    if n <= 1:
        return None
    return Mesh(np.asarray(devices[:n]), (AXIS,))


def shard_population(tree: Any, mesh: Mesh | None) -> Any:
    """Places each leaf with its leading axis split over `mesh` (replicated scalars stay whole)."""
    if mesh is None:
        return tree
    split = NamedSharding(mesh, PartitionSpec(AXIS))
    whole = NamedSharding(mesh, PartitionSpec())

    def place(x):
        return jax.device_put(x, split if getattr(x, "ndim", 0) >= 1 else whole)

    return jax.tree.map(place, tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
