"""jaxlm's XLA:CPU kernels: C++ through the XLA FFI, built for the machine with g++ on first use.

    from pallas_kernels.cpu import cpu_attention   # model.attention='cpu': fused causal attention
    from pallas_kernels.cpu import cpu_matmul      # model.matmul='cpu': dense, C++ weight gradient
    from pallas_kernels.cpu import cpu_normalize   # model.norm_impl='cpu': LayerNorm / RMSNorm

Not Pallas (Pallas cannot compile for a CPU), but kernels in the same sense: each has a plain-jnp
reference (the model's own `xla` path) that the tests hold it to, float32 rounding apart. Sources
`attention.cc`, `matmul.cc`, `norm.cc` and the shared `kernels.h` compile into one library (`build.py`,
cached under ~/.cache/jaxlm). For training and evaluation on one CPU device: the sampler keeps
jnp attention, and under a device mesh the kernels are an error (an FFI call has no partitioning
rule). Why they exist: experiments/results.md, issue 7.
"""

from pallas_kernels.cpu.attention import HEAD_DIMS, check_cpu_attention, cpu_attention
from pallas_kernels.cpu.build import CpuKernelBuildError
from pallas_kernels.cpu.matmul import check_cpu_matmul, cpu_matmul, weight_gradient
from pallas_kernels.cpu.norm import check_cpu_norm, cpu_normalize

__all__ = ["cpu_attention", "check_cpu_attention", "HEAD_DIMS", "cpu_matmul", "check_cpu_matmul",
           "weight_gradient", "cpu_normalize", "check_cpu_norm", "CpuKernelBuildError"]
