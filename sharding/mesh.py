"""Build a `jax.sharding.Mesh` from the experiment's `mesh` section."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES


def resolve_axis_sizes(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Fill in a -1 axis with the devices the others leave; check the product is the device count."""
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if any(v == -1 for v in sizes.values()):
        if n_devices % fixed:
            raise ValueError(
                f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the {n_devices} devices"
            )
        sizes = {a: (n_devices // fixed if v == -1 else v) for a, v in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(
            f"mesh {sizes} has {math.prod(sizes.values())} positions but there are {n_devices} devices; "
            "the axis sizes must multiply to the device count (use -1 for one axis to fill it)"
        )
    return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh with the five named axes, in the order (data, fsdp, tensor, sequence, stage)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_axis_sizes({a: getattr(mesh_cfg, a) for a in MESH_AXES}, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / unusual topologies: plain reshape is fine
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
