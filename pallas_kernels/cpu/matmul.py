"""Dense layers whose weight gradient is a C++ XLA:CPU kernel: `model.matmul='cpu'`.

    from pallas_kernels.cpu import cpu_matmul
    y = cpu_matmul(x, w)        # (N, K) @ (K, M), differentiable

Forward and input gradient are XLA's own matmuls (`jnp.dot`; YNNPACK runs both well); the weight
gradient x^T dy, which XLA:CPU gives to Eigen because its left operand is transposed, is
`matmul.cc` (an outer-product kernel that reads x and dy as they lie). On the shakespeare_char_cpu
model's shapes, 2 threads: 180-262 GFLOP/s against Eigen's 109-194, and the train step 5.7-7.7 %
faster (experiments/results.md, issue 7). Its reference is `jnp.dot`'s own gradient: the tests
hold the two to float32 rounding. Inputs of another float dtype are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.cpu.build import check_one_device, register_kernels

_TARGET = "jaxlm_cpu_weight_grad"


def check_cpu_matmul() -> None:
    """Raise ValueError (CpuKernelBuildError among them) unless this process can run the kernel."""
    register_kernels("model.matmul='cpu'")


def weight_gradient(x: jax.Array, dy: jax.Array) -> jax.Array:
    """x^T dy for x (K, M) and dy (K, N): (M, N) float32."""
    check_cpu_matmul()
    return jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x.shape[1], dy.shape[1]), jnp.float32))(
        x.astype(jnp.float32), dy.astype(jnp.float32))


@jax.custom_vjp
def _matmul(x, w):
    return jnp.dot(x, w)


def _matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())))  # dy w^T, as jnp.dot's own backward
    return dx.astype(x.dtype), weight_gradient(x, dy).astype(w.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def cpu_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (N, K) @ w (K, M), both 2-D; the backward's x^T dy runs in the C++ kernel."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"cpu_matmul: x {x.shape} and w {w.shape} are not (N, K) and (K, M)")
    check_cpu_matmul()
    check_one_device("model.matmul='cpu'")
    return _matmul(x, w)
