"""The device mesh and the shardings the trainer uses.

Today the mesh has one axis, ``'data'``: the batch is split over it and the parameters and
optimizer state are replicated. ``config.mesh`` holds one entry per axis, so more axes
(sequence, tensor) are new entries here, not a new code path.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data",)


def make_mesh(mesh_config, batch_size: int, devices=None) -> Mesh:
    """A mesh of the local devices with the axis sizes of ``mesh_config`` (-1 = all).

    Raises ValueError, before anything compiles, if the devices do not fit or the batch
    does not split evenly over the data axis.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    data = len(devices) if mesh_config.data == -1 else mesh_config.data
    if data > len(devices):
        raise ValueError(
            f"config.mesh.data: expected -1 or at most {len(devices)} (local devices), got {data}"
        )
    grid = np.array(devices[:data]).reshape(data)  # [data]
    mesh = Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    check_divides(mesh, "batch_size", batch_size)
    return mesh


def check_divides(mesh: Mesh, field: str, size: int) -> None:
    """Raise ValueError unless ``config.<field>`` (a batch size) splits over the data axis."""
    data = mesh.shape["data"]
    if size % data:
        raise ValueError(f"config.{field}: expected a multiple of the data axis size {data}, got {size}")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``'data'``, the rest replicated."""
    return NamedSharding(mesh, P("data"))
