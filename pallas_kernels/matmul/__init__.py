"""Tiled matmul with float32 accumulation: GPU (Triton) and TPU (Mosaic) kernels, a reference,
and a differentiable entry point."""

from pallas_kernels.matmul.blocks import MatmulBlockSizes
from pallas_kernels.matmul.ops import matmul
from pallas_kernels.matmul.reference import matmul_reference

__all__ = ["MatmulBlockSizes", "matmul", "matmul_reference"]
