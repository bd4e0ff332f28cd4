"""JAX's persistent compilation cache for the jaxlm commands: a rerun of a recipe loads its
executables from disk instead of compiling them again (the shakespeare_char_cpu recipe's first
step: ~5 s of XLA compile on 2 cores; from the cache, well under a second).

The cache lives in `$JAXLM_CACHE_DIR/xla` (default ~/.cache/jaxlm/xla, beside the CPU kernels'
builds). Every executable is cached whatever its compile time or size (JAX's defaults skip those
that compiled in under a second, which on a 2-core machine are most of a run's start-up). Set
JAXLM_COMPILE_CACHE=0 to compile everything afresh.

JAX keys each entry by the program's HLO, the compile options, the devices and jax/jaxlib's
versions, so a changed model, config or upgrade compiles anew. The C++ CPU kernels
(pallas_kernels/cpu) are called by FFI target name and looked up when the executable is loaded, so
a cached executable runs the kernel library this process registered (a rebuilt library included);
tests/train/test_timeline.py checks that a second process gets the same parameters bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXLM_COMPILE_CACHE"


class CompileCacheSettingError(ValueError):
    """JAXLM_COMPILE_CACHE holds something other than 1 or 0."""


def cache_dir() -> Path:
    return Path(os.environ.get("JAXLM_CACHE_DIR") or Path.home() / ".cache" / "jaxlm") / "xla"


def enable_compile_cache() -> str:
    """Turn the persistent cache on (unless JAXLM_COMPILE_CACHE=0) before the first compile;
    returns what was done, for logs: 'on (<dir>)' or 'off (JAXLM_COMPILE_CACHE=0)'."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return f"off ({ENV}={os.environ[ENV]})"
    if value not in ("1", "true", "yes", "on"):
        raise CompileCacheSettingError(f"{ENV}={os.environ[ENV]!r}: use 1 (cache compiled programs under "
                                       f"{cache_dir()}, the default) or 0 (compile every run afresh)")
    import jax

    path = cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return f"on ({path})"
