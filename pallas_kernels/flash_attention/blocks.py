"""Tile sizes of the flash-attention kernels, a frozen (hashable, jit-static) dataclass."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles along the query (q) and key (k) sequence axes for the forward kernel and the two
    backward kernels (dK/dV: a key block loops over query blocks; dQ: a query block loops over key
    blocks). A block larger than the sequence is clipped to it. `num_warps` / `num_stages` are
    Triton's (GPU only; None = chosen from the head dim)."""

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 128
    block_k_dkv: int = 128
    block_q_dq: int = 128
    block_k_dq: int = 128
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None

    @classmethod
    def default(cls, backend: str) -> "BlockSizes":
        """Per-backend defaults. GPU: Triton on an H100 likes 128-row query tiles and 64-row key
        tiles forward, and narrower tiles backward (two float32 accumulators live in registers).
        TPU: 128 fills the MXU and the 128 lanes that key tiles (and key segment ids) need."""
        if backend == "gpu":
            return cls(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128, block_q_dq=128, block_k_dq=64,
                       num_stages=3, num_stages_bwd=2)
        if backend == "tpu":
            return cls(block_q=128, block_k=128, block_q_dkv=128, block_k_dkv=128, block_q_dq=128, block_k_dq=128)
        raise ValueError(f"backend={backend!r} is not one of gpu, tpu")

    @classmethod
    def uniform(cls, block: int, **kw) -> "BlockSizes":
        """Every tile the same size (tests use 16 or 32)."""
        return cls(block, block, block, block, block, block, **kw)

    def clipped(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Blocks no larger than the sequences they tile."""
        return dataclasses.replace(
            self, block_q=min(self.block_q, q_len), block_k=min(self.block_k, kv_len),
            block_q_dkv=min(self.block_q_dkv, q_len), block_k_dkv=min(self.block_k_dkv, kv_len),
            block_q_dq=min(self.block_q_dq, q_len), block_k_dq=min(self.block_k_dq, kv_len))
