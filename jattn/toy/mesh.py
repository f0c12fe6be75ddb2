"""The device mesh and the shardings the trainer uses.

Two axes, one entry of ``config.mesh`` each: ``'data'`` splits the batch, ``'sequence'``
splits the (padded, zig-zag permuted) sequence of the training batch, with ring attention
between the devices of a row (see ``jattn.toy.train.to_sequence_layout``). Parameters and
optimizer state are replicated. A new axis (tensor) would be a new entry here.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "sequence")


def make_mesh(mesh_config, batch_size: int, devices=None) -> Mesh:
    """A ``[data, sequence]`` mesh of the devices of every process (``jax.devices()``) with the
    sizes of ``mesh_config`` (``data=-1``: all devices that ``sequence`` leaves).

    With several processes the devices are in process order, so a row (``sequence``) holds
    consecutive devices of one process where it fits, and the mesh must use every device.
    Raises ValueError, before anything compiles, if the devices do not fit or the batch
    does not split evenly over the data axis.
    """
    devices = list(jax.devices() if devices is None else devices)
    n, sequence = len(devices), mesh_config.sequence
    what = "local devices" if jax.process_count() == 1 else f"devices of the {jax.process_count()} processes"
    if sequence > n:
        raise ValueError(f"config.mesh.sequence: expected at most {n} ({what}), got {sequence}")
    if mesh_config.data == -1 and n % sequence:
        raise ValueError(
            f"config.mesh.sequence: expected a divisor of the {n} {what} when mesh.data=-1, "
            f"got {sequence}"
        )
    data = n // sequence if mesh_config.data == -1 else mesh_config.data
    if data * sequence > n:
        raise ValueError(
            f"config.mesh.data: expected -1 or at most {n // sequence} ({what}) with "
            f"mesh.sequence={sequence}, got {data}"
        )
    if jax.process_count() > 1 and data * sequence != n:
        raise ValueError(
            f"config.mesh: a run of {jax.process_count()} processes must use all {n} devices "
            f"(data x sequence = {n}), got data={data} x sequence={sequence}"
        )
    grid = np.array(devices[: data * sequence]).reshape(data, sequence)  # [data, sequence]
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


def tokens_sharded(mesh: Mesh) -> NamedSharding:
    """``[B, T]`` arrays: batch split over ``'data'``, sequence over ``'sequence'``."""
    return NamedSharding(mesh, P("data", "sequence"))
