"""Preemption: SIGTERM or SIGINT ends a run cleanly at the next step boundary.

Cloud TPU VMs and spot GPUs get SIGTERM and then about 30 seconds. The loop asks
`PreemptionWatch.should_stop(step)` after every step; on True it saves a checkpoint of that step,
waits for the write to finish and returns, and `python -m train` exits 0 after printing the time
from the signal to the exit. A second Ctrl-C interrupts at once (the default handler is back).

Multi-host: every process must stop at the same step or the collective save hangs. With
`jax.distributed` initialised, JAX's own preemption service catches the signal on any host and
`multihost_utils.reached_preemption_sync_point(step)` becomes True on all of them at the same step;
our handler is then only a fallback for signals JAX does not watch (SIGINT).
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import jax

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
    """Records the first SIGTERM/SIGINT; `should_stop(step)` says whether to save and leave now."""

    def __init__(self):
        self.signal_name: str | None = None
        self.signal_time: float | None = None
        self._previous = {}
        self._installed = False

    def install(self) -> "PreemptionWatch":
        # Signal handlers can only be set from the main thread (a notebook's worker thread cannot).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._installed = True
        return self

    def uninstall(self) -> None:
        if self._installed:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._installed = False

    def _handle(self, signum, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.signal_time = time.monotonic()
            # A second SIGINT (impatient Ctrl-C) gets Python's default: KeyboardInterrupt.
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                if self.signal_name is None:
                    self.signal_name, self.signal_time = "preemption notice", time.monotonic()
                return True
            return False  # a local-only signal would make this host leave its peers mid-collective
        return self.signal_name is not None

    def seconds_since_signal(self) -> float | None:
        return None if self.signal_time is None else time.monotonic() - self.signal_time
