"""Tile sizes of the matmul kernels, a frozen (hashable, jit-static) dataclass."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MatmulBlockSizes:
    """(block_m, block_n) output tile, block_k the contraction step. GPU only: `group_m` output
    tile rows launched together so they share B's columns in L2, and Triton's warps / pipeline
    stages. A block larger than its dimension is clipped (see `clipped`)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3

    @classmethod
    def default(cls, backend: str) -> "MatmulBlockSizes":
        """GPU: Triton's tuned H100 bf16 tile (128 x 256 x 64, 8 warps, 3 stages). TPU: 256 x 256
        output tiles over 512-deep steps fill the MXU and stay far below the scoped VMEM limit."""
        if backend == "gpu":
            return cls(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3)
        if backend == "tpu":
            return cls(block_m=256, block_n=256, block_k=512)
        raise ValueError(f"backend={backend!r} is not one of gpu, tpu")

    def clipped(self, m: int, n: int, k: int) -> "MatmulBlockSizes":
        """Blocks no larger than the next power of two >= the dimension (at least 16): Triton
        tiles are powers of two, and the dimension is zero-padded up to the block."""
        fit = lambda block, dim: min(block, max(16, 1 << (dim - 1).bit_length()))  # noqa: E731
        return dataclasses.replace(self, block_m=fit(self.block_m, m), block_n=fit(self.block_n, n),
                                   block_k=fit(self.block_k, k))
