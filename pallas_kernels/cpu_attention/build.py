"""Compile a C++ XLA FFI kernel for this machine on first use, and cache the shared library.

Pallas has no CPU compiler, so jaxlm's CPU kernel is C++ against the XLA FFI headers that jaxlib
ships (`jax.ffi.include_dir()`), compiled here with the machine's C++ compiler (`$CXX`, default
g++) for the machine's own instruction set (-march=native). The library is cached under
`$JAXLM_CACHE_DIR` (default ~/.cache/jaxlm) by a hash of the source, the flags, the compiler's
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
            f"model.attention='cpu' compiles a C++ kernel on first use and needs a C++ compiler: {cxx!r} "
            "was not found (install g++, or point $CXX at one); or use model.attention='xla'")
    return path


@functools.cache
def load_library(source: Path) -> ctypes.CDLL:
    """The shared library built from `source` (compiled now unless cached), loaded."""
    import jax
    import jaxlib

    cxx = _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise CpuKernelBuildError(f"C++ compiler {cxx} does not run: {e}") from None
    key = hashlib.sha256("\0".join(
        [source.read_text(), " ".join(FLAGS), version, jaxlib.__version__, _cpu_features()]).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            Path(tmp).unlink(missing_ok=True)
            raise CpuKernelBuildError(f"compiling {source.name} failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
        os.replace(tmp, target)
    return ctypes.CDLL(str(target))
