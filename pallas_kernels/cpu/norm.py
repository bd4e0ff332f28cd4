"""LayerNorm / RMSNorm as one C++ XLA:CPU kernel, forward and backward: `model.norm_impl='cpu'`.

    from pallas_kernels.cpu import cpu_normalize
    y = cpu_normalize(x, scale, bias, eps, center)   # as model.layers.normalize, differentiable

`norm.cc`: one pass per row for the statistics and one for the output, the closed-form backward
with dscale/dbias accumulated per block of rows. The reference is model/layers.py's `normalize`
(the jnp path every other run uses); the tests hold the two to float32 rounding, LayerNorm and
RMSNorm, with and without bias. In the shakespeare_char_cpu train step: −3 to −4 %
(experiments/results.md, issue 7). float32; the last axis a multiple of 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cpu.build import check_one_device, register_kernels

_FWD, _BWD = "jaxlm_cpu_norm_fwd", "jaxlm_cpu_norm_bwd"
WIDTH = 16  # the kernel's vector width: the normalized axis must be a multiple


def check_cpu_norm(d_model: int) -> None:
    """Raise ValueError (CpuKernelBuildError among them) unless this process can run the kernel."""
    if d_model % WIDTH:
        raise ValueError(f"model.norm_impl='cpu' needs d_model a multiple of {WIDTH}, not {d_model}; "
                         "use model.norm_impl='xla'")
    register_kernels("model.norm_impl='cpu'")


def _fwd_call(x, scale, bias, eps, center):
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32))
    return jax.ffi.ffi_call(_FWD, shapes)(x, scale, bias, eps=np.float32(eps), center=bool(center))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x, scale, bias, eps, center):
    return _fwd_call(x, scale, bias, eps, center)[0]


def _normalize_fwd(x, scale, bias, eps, center):
    y, rstd = _fwd_call(x, scale, bias, eps, center)
    return y, (x, rstd, scale)


def _normalize_bwd(eps, center, res, dy):
    x, rstd, scale = res
    shapes = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in (x.shape, scale.shape, scale.shape))
    dx, dscale, dbias = jax.ffi.ffi_call(_BWD, shapes)(dy, x, rstd, scale, center=bool(center))
    return dx, dscale, dbias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def cpu_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float, center: bool) -> jax.Array:
    """float32 x (..., D) normalized over its last axis (LayerNorm with `center`, else RMSNorm),
    then `* scale (+ bias)`; scale and bias (D,). Same contract as model.layers.normalize."""
    D = x.shape[-1]
    if scale.shape != (D,) or (bias is not None and bias.shape != (D,)):
        raise ValueError(f"cpu_normalize: scale {scale.shape} / bias {None if bias is None else bias.shape} "
                         f"do not match the last axis of x {x.shape}")
    check_cpu_norm(D)
    check_one_device("model.norm_impl='cpu'")
    if bias is None:  # no bias parameter: its gradient is dropped
        return _normalize(x, scale, jnp.zeros_like(scale), eps, center)
    return _normalize(x, scale, bias, eps, center)
