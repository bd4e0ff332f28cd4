"""Which Pallas backend runs a kernel, and whether it runs compiled or in the interpreter.

On a GPU the Triton-lowered kernels (`gpu.py`) run compiled; on a TPU the Mosaic kernels
(`tpu.py`). A CPU has no Pallas compiler: there a kernel runs only in interpret mode, which
is how the tests check the kernels. Which of the two kernels a CPU interprets is chosen by
the environment variable JAXLM_PALLAS_INTERPRET:

    JAXLM_PALLAS_INTERPRET=gpu   # interpret the GPU kernels (the faster interpreter)
    JAXLM_PALLAS_INTERPRET=tpu   # interpret the TPU kernels under Mosaic TPU interpret mode

Training a model with `model.attention=pallas` on a CPU without that variable is an error
(`check_pallas_platform`), never a silent fallback: the interpreter is for tests, not runs.
"""

from __future__ import annotations

import os

import jax

ENV_VAR = "JAXLM_PALLAS_INTERPRET"
BACKENDS = ("gpu", "tpu")


class PallasPlatformError(ValueError):
    """A kernel was asked for on a platform that cannot run it."""


def device_platform() -> str:
    """'gpu', 'tpu' or 'cpu': the platform of the default device."""
    platform = jax.devices()[0].platform
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def interpret_backend() -> str | None:
    """The backend named by JAXLM_PALLAS_INTERPRET ('gpu' / 'tpu'), None when unset; a bad value is an error."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:  # "1" would not say which kernel family: name it
        raise PallasPlatformError(f"{ENV_VAR}={value!r} is not one of {', '.join(BACKENDS)} (or unset)")
    return value


def resolve(backend: str | None = None) -> tuple[str, bool]:
    """(backend, interpret): which kernel family to use and whether to run it in the interpreter.

    `backend=None` follows the device: compiled GPU/TPU kernels on GPU/TPU; on CPU the family
    named by JAXLM_PALLAS_INTERPRET (default 'gpu'), interpreted. An explicit backend that differs
    from the device (e.g. 'tpu' on a CPU) is interpreted.
    """
    platform = device_platform()
    if backend is None:
        backend = platform if platform in BACKENDS else (interpret_backend() or "gpu")
    if backend not in BACKENDS:
        raise PallasPlatformError(f"pallas backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend, backend != platform


def interpret_arg(backend: str, interpret: bool):
    """The value for `pallas_call(interpret=...)`: TPU kernels need Mosaic TPU interpret mode
    (`pltpu.InterpretParams()`), which models VMEM/SMEM; the GPU kernels use the generic interpreter."""
    if not interpret:
        return False
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return True


def check_pallas_platform(what: str) -> None:
    """Raise PallasPlatformError unless compiled Pallas kernels (or an explicit interpreter
    request) can run here. `what` names the setting, e.g. "model.attention='pallas'"."""
    platform = device_platform()
    if platform in BACKENDS or interpret_backend() is not None:
        return
    raise PallasPlatformError(
        f"{what} needs a GPU or TPU, but the device is {platform!r}; use the 'xla' setting here, or set "
        f"{ENV_VAR}=gpu|tpu to run the kernels in the (slow) Pallas interpreter")
