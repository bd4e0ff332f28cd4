"""The host side of the numerical guard (the device side is in `train/step.py`).

The jitted step skips any update whose loss or gradient is not finite, or whose loss exceeds the
limit passed in (loss-spike skipping). This class keeps what spans steps: the running mean of the
loss that sets that limit, the count of skipped steps, and the streak of non-finite steps that stops
the run after `train.max_nonfinite` in a row. Its state travels in every checkpoint, so a resumed
run skips exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math

import jax.numpy as jnp

log = logging.getLogger(__name__)

SPIKE_WARMUP_STEPS = 10  # applied steps before the running mean is trusted to judge spikes
SPIKE_EMA_DECAY = 0.9


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row: the run stops; its last checkpoint is left as it was."""


class NumericalGuard:
    def __init__(self, max_nonfinite: int, spike_factor: float):
        self.max_nonfinite = max_nonfinite
        self.spike_factor = spike_factor
        self.loss_mean: float | None = None
        self.applied = 0  # applied steps seen (for the spike warm-up)
        self.streak = 0  # consecutive non-finite steps
        self.nonfinite_total = 0
        self.spikes_total = 0

    def step_args(self) -> tuple:
        """Extra arguments for `train_step`: the loss limit when spike skipping is on."""
        if not self.spike_factor:
            return ()
        trusted = self.loss_mean is not None and self.applied >= SPIKE_WARMUP_STEPS
        return (jnp.float32(self.spike_factor * self.loss_mean if trusted else math.inf),)

    def observe(self, step: int, metrics: dict, last_checkpoint: str) -> None:
        """Account for the step that just ran (`step` = steps done); raise after K non-finite in a row."""
        loss, nonfinite, skipped = float(metrics["loss"]), bool(metrics["nonfinite"]), bool(metrics["skipped"])
        if nonfinite:
            self.streak += 1
            self.nonfinite_total += 1
            log.warning("step %d: non-finite loss or gradient (loss=%s); update skipped (%d in a row)",
                        step, loss, self.streak)
            if self.max_nonfinite and self.streak >= self.max_nonfinite:
                raise NonFiniteLossError(
                    f"stopping at step {step}: {self.streak} non-finite steps in a row "
                    f"(train.max_nonfinite={self.max_nonfinite}); parameters were never updated with them; "
                    f"the last good checkpoint is {last_checkpoint}. Lower optim.lr or check the data, then resume.")
            return
        self.streak = 0
        if skipped:
            self.spikes_total += 1
            log.warning("step %d: loss %.4g is over %.3g x the running mean %.4g; update skipped",
                        step, loss, self.spike_factor, self.loss_mean)
            return
        self.applied += 1
        self.loss_mean = loss if self.loss_mean is None else SPIKE_EMA_DECAY * self.loss_mean + (1 - SPIKE_EMA_DECAY) * loss

    def state_dict(self) -> dict:
        return {"loss_mean": self.loss_mean, "applied": self.applied, "streak": self.streak,
                "nonfinite_total": self.nonfinite_total, "spikes_total": self.spikes_total}

    def load_state_dict(self, d: dict) -> None:
        for k in ("loss_mean", "applied", "streak", "nonfinite_total", "spikes_total"):
            if k in d:
                setattr(self, k, d[k])
