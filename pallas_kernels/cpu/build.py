"""Compile jaxlm's C++ XLA FFI kernels for this machine on first use, and cache the shared library.

Pallas has no CPU compiler, so jaxlm's CPU kernels are C++ against the XLA FFI headers that jaxlib
ships (`jax.ffi.include_dir()`), compiled here with the machine's C++ compiler (`$CXX`, default
g++) for the machine's own instruction set (-march=native), all sources into one library. It is
cached under `$JAXLM_CACHE_DIR` (default ~/.cache/jaxlm) by a hash of the sources and the headers
beside them, the flags, the compiler's
version, jaxlib's version and the CPU's feature flags, so an edit, an upgrade or another CPU gets
its own build. Concurrent first uses (several processes) each compile to a temporary file and
rename it into place, so a reader never sees half a library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class CpuKernelBuildError(ValueError):
    """The CPU kernel could not be compiled (no compiler, a compile error): a ValueError, so a run
    that asks for the kernel stops at start-up with this message (train.loop: ConfigError)."""


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLM_CACHE_DIR") or Path.home() / ".cache" / "jaxlm") / "cpu_kernels"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "g++"
    path = shutil.which(cxx)
    if path is None:
        raise CpuKernelBuildError(
            f"the CPU kernels (model.attention / matmul / norm_impl = 'cpu') are C++ compiled on first use and need "
            f"a C++ compiler: {cxx!r} was not found (install g++, or point $CXX at one); or use 'xla'")
    return path


@functools.cache
def load_library(name: str, sources: tuple[Path, ...]) -> ctypes.CDLL:
    """The shared library `name` built from `sources` (compiled now unless cached), loaded."""
    import jax
    import jaxlib

    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CpuKernelBuildError(f"C++ compiler {cxx} does not run: {e}") from None
    folders = sorted({p.parent for p in sources})
    texts = [p.read_text() for p in sources] + [h.read_text() for d in folders for h in sorted(d.glob("*.h"))]
    key = hashlib.sha256("\0".join(
        [*texts, " ".join(FLAGS), version, jaxlib.__version__, _cpu_features()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        includes = [f"-I{jax.ffi.include_dir()}", *(f"-I{d}" for d in folders)]
        cmd = [cxx, *FLAGS, *includes, *map(str, sources), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            names = ", ".join(p.name for p in sources)
            raise CpuKernelBuildError(f"compiling {names} failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
        os.replace(tmp, target)
    return ctypes.CDLL(str(target))


SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cc")))  # attention.cc, matmul.cc, norm.cc
TARGETS = {  # FFI target name -> handler symbol in the library
    "jaxlm_cpu_attention_fwd": "JaxlmAttentionFwd",
    "jaxlm_cpu_attention_bwd": "JaxlmAttentionBwd",
    "jaxlm_cpu_weight_grad": "JaxlmWeightGrad",
    "jaxlm_cpu_norm_fwd": "JaxlmNormFwd",
    "jaxlm_cpu_norm_bwd": "JaxlmNormBwd",
}


@functools.cache
def _register_all() -> None:
    import jax

    lib = load_library("jaxlm_cpu_kernels", SOURCES)
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


def register_kernels(setting: str) -> None:
    """Build (or load the cached build of) the kernels and register their FFI targets, once.
    `setting` names the config choice in the error when the device is not a CPU."""
    import jax

    platform = jax.devices()[0].platform
    if platform != "cpu":
        raise ValueError(f"{setting} is an XLA:CPU kernel, but the device is {platform!r}; use 'xla' "
                         "(or 'pallas' / 'cudnn' on a GPU)")
    _register_all()


def check_one_device(setting: str) -> None:
    """An FFI call has no partitioning rule (under a mesh XLA would gather its inputs to every
    device), so the kernels run on one device: a ValueError naming `setting` under a larger mesh."""
    import math

    import jax

    mesh = jax.sharding.get_abstract_mesh()
    size = 1 if mesh.empty else math.prod(mesh.shape.values())
    if size > 1:
        raise ValueError(f"{setting} runs on one device, but a mesh of {size} devices is active; "
                         "use 'xla' with a mesh")
