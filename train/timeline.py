"""Where the whole command's time goes: a per-phase timeline of one run, from the process's real
start (so the interpreter's start-up and imports count) to the end, with the peak resident set and
JAX's compile time and persistent-cache hits.

    python -m train experiments/shakespeare_char_cpu.yaml ...   # writes <run>/timeline.json and prints
    timeline: 27.5 s = interpreter 6.3 | imports 9.0 | setup 0.6 | ... | close 0.0 ; XLA compiling 0.0 s
    (22 executables, 22 from the cache in 0.7 s) ; peak RSS 494 MiB

Phases are wall-clock intervals that do not overlap: `with TIMELINE.phase("eval"):` adds the block's
duration to "eval" (a phase entered several times, such as the periodic evaluations, accumulates);
time outside every phase between two phases is attributed to the next phase that starts, so the
phases sum to the wall time from process start to `finish()` (the interpreter's own exit after that
is measured from outside by `python -m train.bench --end-to-end`).

Compile time is JAX's own event for every backend compile (`/jax/core/compile/backend_compile_duration`):
a run whose executables all come from the persistent compilation cache (train/compile_cache.py)
has none, and its cache hits are counted from `/jax/compilation_cache/cache_hits`.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
import weakref
from pathlib import Path

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
CACHE_LOAD_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"


def process_start_time() -> float:
    """The Unix time this process started (before the interpreter ran a line), from
    /proc/self/stat's starttime (clock ticks after boot) and /proc/stat's btime; where /proc is
    missing, the time this module was imported."""
    try:
        stat = Path("/proc/self/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
        start_ticks = int(fields[19])  # field 22 of proc(5)
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1]) + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORTED_AT


_IMPORTED_AT = time.time()


def rss_bytes() -> int:
    """This process's resident set now (/proc/self/statm; 0 where there is none)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (getrusage ru_maxrss: KiB on Linux, bytes on macOS;
    the kernel updates it lazily, so never less than the resident set now)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak if sys.platform == "darwin" else peak * 1024, rss_bytes())


class Timeline:
    """Phase durations of one process (see module docstring)."""

    def __init__(self, start: float | None = None):
        self.start = process_start_time() if start is None else start  # Unix time
        self.phases: dict[str, float] = {}
        self.rss_mib: dict[str, float] = {}  # the largest resident set seen at the end of each phase
        self._last = self.start  # where the next phase's time begins
        self._open: str | None = None
        self.compile_s = 0.0  # JAX's backend-compile event, which includes persistent-cache lookups
        self.cache_load_s = 0.0
        self.compiles = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def listen_to_jax(self) -> None:
        """Count JAX's backend compiles and persistent-cache hits from now on (imports jax)."""
        _listen(self)

    def mark(self, name: str) -> None:
        """End phase `name` now: the time since the previous phase ended is added to it."""
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + (now - self._last)
        self.rss_mib[name] = max(self.rss_mib.get(name, 0.0), rss_bytes() / 2**20)
        self._last = now

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the block as `name`; whatever ran since the previous phase goes to the phase that was
        open around it (or to "other" at top level). Nested phases are charged to the inner one."""
        outer = self._open
        self.mark(outer or "other")
        self._open = name
        try:
            yield
        finally:
            self.mark(name)
            self._open = outer

    @property
    def xla_compile_s(self) -> float:
        """Seconds XLA spent compiling (JAX's compile event less the persistent-cache loads)."""
        return max(self.compile_s - self.cache_load_s, 0.0)

    @property
    def wall_s(self) -> float:
        return self._last - self.start

    def to_dict(self) -> dict:
        return {
            "process_start_unix": self.start,
            "wall_s": self.wall_s,
            "phases_s": dict(self.phases),
            "rss_at_phase_end_mib": dict(self.rss_mib),
            "compile_s": self.xla_compile_s,
            "cache_load_s": self.cache_load_s,
            "compiles": self.compiles,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def line(self) -> str:
        """The one-line summary printed at the end of a run."""
        parts = " | ".join(f"{k} {v:.1f}" for k, v in self.phases.items() if v >= 0.05 or k != "other")
        return (f"timeline: {self.wall_s:.1f} s = {parts} ; XLA compiling {self.xla_compile_s:.1f} s "
                f"({self.compiles} executables, {self.cache_hits} from the cache in {self.cache_load_s:.1f} s) ; "
                f"peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")

    def finish(self, run_dir: Path | None = None, name: str = "close") -> dict:
        """Close phase `name`, write timeline.json into `run_dir` (if given) and return the record."""
        self.mark(name)
        record = self.to_dict()
        if run_dir is not None:
            from train.run_files import write_json

            write_json(Path(run_dir) / "timeline.json", record)
        return record


_LISTENERS: "weakref.WeakSet[Timeline]" = weakref.WeakSet()


def _listen(timeline: Timeline) -> None:
    """Register JAX monitoring listeners once per process; they feed every live listening timeline."""
    if not getattr(_listen, "registered", False):
        import jax

        def on_duration(event: str, duration: float, **_) -> None:
            for t in list(_LISTENERS):
                if event == COMPILE_EVENT:  # XLA's compile, or the cache lookup and load that replaced it
                    t.compile_s += duration
                    t.compiles += 1
                elif event == CACHE_LOAD_EVENT:  # recorded on hits only
                    t.cache_load_s += duration

        def on_event(event: str, **_) -> None:
            for t in list(_LISTENERS):
                if event == CACHE_HIT_EVENT:
                    t.cache_hits += 1
                elif event == CACHE_MISS_EVENT:
                    t.cache_misses += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        _listen.registered = True
    _LISTENERS.add(timeline)


# The timeline of this process, from its start: `python -m train` passes it to the Trainer; a
# Trainer made elsewhere (a test, a notebook) has a timeline of its own that starts with it.
TIMELINE: Timeline | None = None


def process_timeline() -> Timeline:
    """This process's timeline, created on first use (starting at the process's real start)."""
    global TIMELINE
    if TIMELINE is None:
        TIMELINE = Timeline()
    return TIMELINE
