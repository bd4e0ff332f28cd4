"""The compiled (not interpreted) kernels lower for their hardware: Triton IR for the GPU
kernels and Mosaic for the TPU kernels, from a CPU, through jax.export's cross-platform lowering.
This catches what interpret mode cannot: an operation or block shape the real compiler path
rejects. (Compiling and running them needs the hardware: pallas_kernels/gpu_check.py.)"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels import platform
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.matmul import matmul

TARGETS = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}


@pytest.mark.parametrize("backend", sorted(TARGETS))
def test_kernels_lower_to_the_hardware_compiler(backend, monkeypatch):
    if platform.device_platform() != "cpu":
        pytest.skip("cross-platform lowering check, run from a CPU")
    target, custom_call = TARGETS[backend]
    monkeypatch.setattr(platform, "device_platform", lambda: backend)  # compiled kernels, not the interpreter
    if backend == "gpu":  # jax >= 0.11 reads the GPU's compute capability from the device: lower for an H100
        try:
            from jax._src.pallas.triton import gpu_info
        except ImportError:  # jax 0.10: the Triton lowering needs no device
            gpu_info = None
        if gpu_info is not None:
            monkeypatch.setitem(gpu_info.registry, jax.devices()[0].device_kind,
                                lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100))
    if backend == "tpu":  # Mosaic reads the chip's tiling from the device kind: lower for a v5e
        from jax._src.pallas.mosaic import tpu_info

        monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                            lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))

    def attention_and_grads(q, k, v, seg):  # default block sizes, grouped heads, causal + segments
        f = lambda q, k, v: flash_attention(q, k, v, causal=True, q_segment_ids=seg)  # noqa: E731
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), (0, 1, 2))(q, k, v)

    def matmul_and_grads(a, b):  # shapes that are no multiple of the tiles
        return jax.grad(lambda a, b: jnp.sum(matmul(a, b).astype(jnp.float32)), (0, 1))(a, b)

    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    checks = [export.DisabledSafetyCheck.custom_call(custom_call)]
    for fn, args, n_kernels in (
            (attention_and_grads, (bf16(2, 256, 4, 128), bf16(2, 256, 2, 128), bf16(2, 256, 2, 128),
                                   jax.ShapeDtypeStruct((2, 256), jnp.int32)), 3),
            (matmul_and_grads, (bf16(300, 512), bf16(512, 1000)), 2)):
        module = export.export(jax.jit(fn), platforms=[target], disabled_checks=checks)(*args).mlir_module()
        calls = re.findall(r"custom_call @([\w$.]+)", module)
        assert calls.count(custom_call) >= n_kernels, (fn.__name__, calls)
