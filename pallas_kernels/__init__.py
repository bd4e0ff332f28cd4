"""Pallas kernels written in this project, each beside a plain-jnp reference.

    from pallas_kernels.flash_attention import flash_attention   # (B, L, H, Dh) causal/GQA/segments
    from pallas_kernels.matmul import matmul                     # tiled, float32 accumulation

Both are differentiable (`custom_vjp`), run compiled on GPU (Triton lowering) and TPU (Mosaic),
and in interpret mode on CPU (see `platform.py`). `python -m pallas_kernels.bench` times them
against XLA and cuDNN; `python -m pallas_kernels.gpu_check` is the one-command GPU check.

    from pallas_kernels.cpu import cpu_attention, cpu_matmul    # not Pallas: C++ through the XLA FFI

`cpu/` is the exception to the name: Pallas cannot compile for a CPU, so jaxlm's CPU kernels
(`model.attention=cpu`, `model.matmul=cpu`) are C++ built with g++ on first use; their references
are the model's own jnp paths.
"""
