"""Flash attention (online softmax over key blocks, no L x S matrix): GPU (Triton) and TPU
(Mosaic) kernels, a plain-jnp reference, and a differentiable entry point."""

from pallas_kernels.flash_attention.blocks import BlockSizes
from pallas_kernels.flash_attention.ops import flash_attention
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["BlockSizes", "flash_attention", "attention_reference"]
