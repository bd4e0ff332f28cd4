"""Build a `jax.sharding.Mesh` from the experiment's `mesh` section, and start JAX's multi-process
runtime (`jax.distributed`) when the job spans several hosts.

    initialize_distributed(cfg.mesh)   # first, before any other JAX call: a no-op on one host
    mesh = make_mesh(cfg.mesh)         # axes (data, fsdp, tensor, sequence, stage)

Multi-slice TPU: `dcn_<axis>` sizes say how many slices an axis spans (over the data-centre
network); the plain sizes are the axis sizes within one slice (over ICI). The mesh axis size is
their product, and the slow DCN links carry only the axes you put there (usually `data`).
"""

from __future__ import annotations

import logging
import math
import os
import types

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES, ShardingError

log = logging.getLogger(__name__)


def resolve_axis_sizes(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    """Fill in a -1 axis with the devices the others leave; check the product is the device count."""
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if any(v == -1 for v in sizes.values()):
        if n_devices % fixed:
            raise ShardingError(
                f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the {n_devices} devices"
            )
        sizes = {a: (n_devices // fixed if v == -1 else v) for a, v in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise ShardingError(
            f"mesh {sizes} has {math.prod(sizes.values())} positions but there are {n_devices} devices; "
            "the axis sizes must multiply to the device count (use -1 for one axis to fill it)"
        )
    return sizes


def dcn_sizes(mesh_cfg) -> dict[str, int]:
    return {a: getattr(mesh_cfg, f"dcn_{a}", 1) for a in MESH_AXES}


def mesh_devices(mesh_cfg) -> list:
    """The devices the mesh spans: all of them, or the first `mesh.num_devices` (single process)."""
    devices = jax.devices()
    n = getattr(mesh_cfg, "num_devices", 0)
    if n:
        if jax.process_count() > 1:
            raise ShardingError("mesh.num_devices selects devices of one process; leave it 0 with several processes")
        if n > len(devices):
            raise ShardingError(f"mesh.num_devices={n} but only {len(devices)} devices are visible")
        devices = devices[:n]
    return devices


def device_grid(mesh_cfg, devices: list) -> np.ndarray:
    """Arrange `devices` into the mesh shape (data, fsdp, tensor, sequence, stage).

    One slice: `mesh_utils.create_device_mesh` (topology-aware on TPU; a plain reshape elsewhere).
    Several slices (any `dcn_<axis>` > 1): `create_hybrid_device_mesh`, ICI axes inside each slice
    and DCN axes across slices (devices must carry `slice_index`, as Cloud TPU multislice ones do).
    """
    from jax.experimental import mesh_utils

    dcn = dcn_sizes(mesh_cfg)
    n_slices = math.prod(dcn.values())
    if len(devices) % n_slices:
        raise ShardingError(f"the dcn_* mesh sizes multiply to {n_slices} slices, which does not divide "
                            f"the {len(devices)} devices")
    ici = resolve_axis_sizes({a: getattr(mesh_cfg, a) for a in MESH_AXES}, len(devices) // n_slices)
    ici_shape = tuple(ici[a] for a in MESH_AXES)
    if n_slices > 1:
        dcn_shape = tuple(dcn[a] for a in MESH_AXES)
        try:
            return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices=devices)
        except ValueError as e:
            raise ShardingError(f"multi-slice mesh ici={ici} dcn={dcn}: {e}") from None
    try:
        return mesh_utils.create_device_mesh(ici_shape, devices=devices)
    except Exception:  # CPU / unusual topologies: plain reshape keeps each process's devices together
        return np.asarray(devices).reshape(ici_shape)


def parse_mesh(text: str) -> dict[str, int]:
    """A `--mesh` value, 'fsdp=2,tensor=4' -> {'data': 1, 'fsdp': 2, 'tensor': 4, 'sequence': 1,
    'stage': 1} (axes not named are 1; '' is one device). ShardingError naming a bad item."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if name not in MESH_AXES or not value.isdigit() or int(value) < 1:
            raise ShardingError(f"--mesh item {item!r} must be AXIS=N with N >= 1 and AXIS one of "
                                f"{', '.join(MESH_AXES)}")
        sizes[name] = int(value)
    return sizes


def mesh_from_sizes(sizes: dict[str, int], devices=None) -> Mesh:
    """A mesh of the given axis sizes ({axis: n}, missing axes 1) over the first prod(sizes)
    devices (or `devices`): what the inference commands build from `--mesh`, without an
    experiment config. ShardingError when there are not enough devices."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    n = math.prod(sizes.values())
    available = list(devices if devices is not None else jax.devices())
    if n > len(available):
        named = ",".join(f"{a}={s}" for a, s in sizes.items() if s > 1)
        raise ShardingError(f"mesh {named} needs {n} devices but {len(available)} are visible")
    return make_mesh(types.SimpleNamespace(**sizes), available[:n])


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh with the five named axes, in the order (data, fsdp, tensor, sequence, stage).
    Raises `ShardingError` when the sizes do not match the device count."""
    devices = list(devices if devices is not None else mesh_devices(mesh_cfg))
    grid = device_grid(mesh_cfg, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ---- multi-host start-up -------------------------------------------------------------------

def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ShardingError(f"environment variable {name}={value!r} must be an integer") from None


def distributed_settings(mesh_cfg, environ=None) -> dict | None:
    """How to start `jax.distributed`, or None for a single process.

    1. `mesh.coordinator_address` / `num_processes` / `process_id` from the config, else the
       environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID: explicit.
    2. On a Cloud TPU VM with several workers, or inside a SLURM job with several tasks, JAX
       detects everything itself: `{}` (initialize with no arguments).
    """
    env = os.environ if environ is None else environ
    address = getattr(mesh_cfg, "coordinator_address", "") or env.get("JAX_COORDINATOR_ADDRESS", "")
    num = getattr(mesh_cfg, "num_processes", 0) or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = getattr(mesh_cfg, "process_id", -1)
    if pid < 0 and env.get("JAX_PROCESS_ID", ""):
        pid = int(env["JAX_PROCESS_ID"])
    if address:
        if num < 1 or pid < 0:
            raise ShardingError(
                f"coordinator address {address!r} is set, so mesh.num_processes (or JAX_NUM_PROCESSES) and "
                "mesh.process_id (or JAX_PROCESS_ID) must be too")
        if not 0 <= pid < num:
            raise ShardingError(f"process id {pid} must be in [0, {num})")
        return {"coordinator_address": address, "num_processes": num, "process_id": pid}
    tpu_workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return {}  # Cloud TPU VM pod slice / multislice: JAX reads the TPU metadata
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return {}  # SLURM: JAX reads SLURM_* variables
    return None


def initialize_distributed(mesh_cfg) -> bool:
    """Start `jax.distributed` when the job has several processes (see `distributed_settings`).
    Must run before any other JAX call; idempotent. Returns True when this job is multi-process."""
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(mesh_cfg)
    if settings is None:
        return False
    log.info("starting jax.distributed %s", settings or "(auto-detected cluster)")
    jax.distributed.initialize(**settings)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True
