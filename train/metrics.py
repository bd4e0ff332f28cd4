"""Throughput accounting (tokens/s, MFU against the hardware's peak) and metric writers
(`metrics.jsonl` + TensorBoard events)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip for the compute dtypes we train in (bfloat16 on accelerators),
# from the vendors' spec sheets. Matched by substring of `device.device_kind` (lower case).
PEAK_FLOPS = {
    "tpu v6": 918e12,  # Trillium (v6e)
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,  # v5e reports "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
    "tpu v3": 123e12,
    "h200": 989e12,
    "h100": 989e12,  # SXM, dense bf16
    "a100": 312e12,
    "l4": 121e12,
}


def measure_cpu_matmul_flops(n: int = 512, min_time_s: float = 0.3) -> float:
    """Float32 matmul FLOP/s this host reaches with XLA (all its threads): the CPU 'peak' that
    MFU is measured against, since CPUs have no spec-sheet number that XLA can reach."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    reps, t0 = 0, time.perf_counter()
    while True:
        f(a).block_until_ready()
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time_s:
            return 2 * n**3 * reps / elapsed


def peak_flops(devices=None) -> tuple[float, str]:
    """(total peak FLOP/s of `devices`, how it was obtained). Simulated CPU devices share the
    host's cores, so the CPU figure is the host's measured rate, not multiplied by device count."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind.lower()
    if devices[0].platform == "cpu":
        return measure_cpu_matmul_flops(), "measured float32 matmul on this CPU"
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops * len(devices), f"spec-sheet peak of {len(devices)} x {devices[0].device_kind}"
    return math.nan, f"unknown peak for {devices[0].device_kind}"


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.tb = _summary_writer_class()(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _summary_writer_class():
    """tensorboardX imports torch when it is installed (about 3 s per process start) only to
    recognise torch tensors; we log plain floats, so hide torch from that import unless something
    already loaded it."""
    import sys

    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v
