"""Keep freed host memory in the process, so XLA:CPU's per-call buffers do not page-fault every step.

XLA:CPU allocates an executable's temporaries afresh on every call: 48 MB for the train step of
the shakespeare_char_cpu model, ~270 MB for the 6 x 384 model at batch 4 x 256. glibc's malloc
serves blocks that large with a fresh `mmap` and gives them back with `munmap` when freed, so every
step writes to brand-new pages and the kernel zero-fills each one on first touch: ~13,000 minor page
faults (52 MB) per step of the small model, ~80,000 of the larger one, a quarter of the step time
or more (issue 7, experiments/results.md).

`keep_freed_host_memory()` sets three glibc malloc parameters (mallopt(3)):
- M_ARENA_MAX=1: every thread allocates from the main arena. XLA's worker threads otherwise get
  arenas of their own, whose heaps hold at most 64 MB and so fall back to mmap for anything larger,
  whatever M_MMAP_MAX says.
- M_MMAP_MAX=0: large blocks come from the heap, not from mmap.
- M_TRIM_THRESHOLD=2 GiB - 1 (the largest mallopt takes): free memory at the top of the heap stays
  with the process up to that size instead of going back to the OS, ready for the next step.

The cost is resident memory: the heap grows over the first steps until each step's blocks fit into
memory freed by the step before, then stays. It grows by a whole block of temporaries at a time
(36 MB for the shakespeare_char_cpu step), two to four times in a run, as a block is sometimes
still allocated when the next step allocates its own, and the holes this leaves stay resident.
`HeapWatch` (called by the training loop after each step) gives the free pages of the heap back
(malloc_trim) whenever the heap has grown since its last call: the rare growth is then no longer
added to the holes before it, which keeps the recipe's peak resident set one block above the
settled size instead of two to four (a trimmed hole faults in again once when it is reused, not
every step). The growth itself comes from a race: XLA:CPU frees a step's temporaries on its worker
thread just after the step's outputs are ready, so the next step, dispatched at once, sometimes
allocates its own block while the last one is still held (a third of the steps of the
shakespeare_char_cpu recipe). `HeapWatch.before_step()` notes the bytes in use before a dispatch and
the call after the step waits (polling mallinfo2, at most 50 ms) until they are back to that: the next
step then reuses the same block, and the heap stays at one block of temporaries. Measured (`python -m train.bench`'s models): the small
model's process settled at ~0.7 GB either way; the 6 x 384 model's at 1.7 GB instead of 1.15 GB
(after ~20 steps). Set JAXLM_KEEP_HOST_MEMORY=0 to keep glibc's defaults.

It only concerns XLA:CPU: when JAX_PLATFORMS names another platform, or (JAX_PLATFORMS unset) a
GPU or TPU plugin is installed, it leaves malloc alone; the accelerators' memory is not malloc's and
one arena for all host threads would be a point of contention on a large host.

Call it before JAX's first computation: threads that already have an arena of their own keep it.
The jaxlm commands (`python -m train`, `python -m infer`, the benchmarks) and the test suite call
it first thing; in a notebook, call it in the first cell. Elsewhere (macOS, musl) it does nothing.
PyTorch needs no such setting: its eager CPU step made ~250 page faults with glibc's defaults and
ran no faster with these (see train/bench.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys

ENV = "JAXLM_KEEP_HOST_MEMORY"

# mallopt(3) parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))

_status: str | None = None


class HostMemorySettingError(ValueError):
    """JAXLM_KEEP_HOST_MEMORY holds something other than 1 or 0."""


def _glibc():
    """The C library if it is glibc (it has mallopt and gnu_get_libc_version), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None
    return libc


def _accelerator() -> str | None:
    """Why JAX will not (only) run on the CPU here, or None: JAX_PLATFORMS names another platform,
    or it is unset and a GPU/TPU plugin is installed (libtpu, or a `jax_plugins` entry point such
    as jax-cuda12-plugin's)."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return None if set(platforms) == {"cpu"} else f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}"
    if importlib.util.find_spec("libtpu") is not None:
        return "libtpu is installed"
    plugins = sorted({ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")})
    return f"JAX plugin {', '.join(plugins)} is installed" if plugins else None


def keep_freed_host_memory() -> str:
    """Apply the malloc settings above once per process; returns what was done, for logs and
    benchmark headers: 'on (glibc X)', 'off (JAXLM_KEEP_HOST_MEMORY=0)', 'not needed (...)' or
    'unavailable (...)'."""
    global _status
    if _status is not None:
        return _status
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        _status = f"off ({ENV}={os.environ[ENV]})"
        return _status
    if value not in ("1", "true", "yes", "on"):
        raise HostMemorySettingError(f"{ENV}={os.environ[ENV]!r}: use 1 (keep freed host memory, the default) "
                                     "or 0 (glibc's defaults)")
    accelerator = _accelerator()
    if accelerator is not None:
        _status = f"not needed ({accelerator}: XLA:CPU's buffers are not the ones that matter)"
        return _status
    libc = _glibc()
    if libc is None:
        _status = "unavailable (the C library is not glibc)"
        return _status
    failed = [param for param, setting in SETTINGS if libc.mallopt(param, setting) != 1]
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    version = libc.gnu_get_libc_version().decode()
    _status = f"on (glibc {version})" if not failed else f"partly (glibc {version} refused mallopt {failed})"
    return _status


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapWatch:
    """After each step: if the heap (glibc's non-mmapped space, mallinfo2) grew since the last call,
    return its free pages to the OS with malloc_trim(0); see the module docstring. Does nothing
    unless `keep_freed_host_memory()` is on (glibc 2.33+ for mallinfo2)."""

    SLACK = 4 << 20  # bytes in use after a step may exceed those before it by this much (new arrays)
    TIMEOUT_S = 0.05  # the longest wait for a step's temporaries to be freed
    GIVE_UP_AFTER = 10  # consecutive waits that time out (in use grows by itself): stop waiting
    REGROW_CALLS = 50  # a heap grown back to its size before the last trim: trimmed again at most this often

    def __init__(self):
        self.trims = 0
        self.waits = 0  # steps whose temporaries were still held when their outputs were read
        self.waited_s = 0.0
        self.timeouts = 0
        self._timeouts_in_a_row = 0
        self._before: int | None = None
        self._size = 0  # the largest heap seen
        self._trimmed_to = 0  # the heap's size after the last trim
        self._calls = 0
        self._last_trim = 0
        self._libc = _glibc() if (_status or "").startswith("on") else None
        if self._libc is not None and hasattr(self._libc, "mallinfo2") and hasattr(self._libc, "malloc_trim"):
            self._libc.mallinfo2.restype = _MallInfo2
        else:
            self._libc = None

    def heap_bytes(self) -> int:
        return self._libc.mallinfo2().arena if self._libc is not None else 0

    def before_step(self) -> None:
        """Note the bytes in use just before a step is dispatched: the call after the step waits
        until its temporaries are freed (see the module docstring)."""
        if self._libc is not None and self._timeouts_in_a_row < self.GIVE_UP_AFTER:
            self._before = self._libc.mallinfo2().uordblks

    def _settle(self) -> None:
        """Wait until the bytes in use are back to those noted by `before_step` (+ SLACK), at most
        TIMEOUT_S; after GIVE_UP_AFTER timeouts in a row, stop waiting for the rest of the run."""
        limit, self._before = self._before + self.SLACK, None
        if self._libc.mallinfo2().uordblks <= limit:
            return
        import time

        t0 = time.perf_counter()
        self.waits += 1
        while self._libc.mallinfo2().uordblks > limit:
            if time.perf_counter() - t0 > self.TIMEOUT_S:
                self.timeouts += 1
                self._timeouts_in_a_row += 1
                break
            time.sleep(0.0002)
        else:
            self._timeouts_in_a_row = 0
        self.waited_s += time.perf_counter() - t0

    def __call__(self) -> bool:
        """After a step's outputs were read: wait for its temporaries to be freed (if
        `before_step` was called), then trim if the heap is larger than ever before (or this is the
        first call: the set-up and the first step leave holes), or if it grew back above its size
        after the last trim and that trim was REGROW_CALLS calls ago or more (a checkpoint save's
        allocations, between the steps' blocks, refill the heap a trim had shrunk; not at once, or a
        heap whose top each step reuses would be trimmed and faulted in again every step); True if
        it trimmed."""
        if self._libc is None:
            return False
        if self._before is not None:
            self._settle()
        self._calls += 1
        size = self._libc.mallinfo2().arena
        grew = size > self._size or (size > self._trimmed_to and self._calls - self._last_trim >= self.REGROW_CALLS)
        self._size = max(size, self._size)
        if grew:
            self.trim()
        return grew

    def trim(self) -> None:
        """Give the heap's free pages back now (before a phase that allocates differently)."""
        if self._libc is not None:
            self._libc.malloc_trim(0)
            self.trims += 1
            self._trimmed_to = self._libc.mallinfo2().arena
            self._last_trim = self._calls


def keep_freed_host_memory_or_exit(prog: str) -> str:
    """`keep_freed_host_memory()` for a command line: a bad JAXLM_KEEP_HOST_MEMORY is one line on
    stderr, `prog: error: ...`, and exit status 2 (as argparse reports a bad argument)."""
    try:
        return keep_freed_host_memory()
    except HostMemorySettingError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
