"""What training adds to the model's checkpoint (model/checkpoint.py): exact resume.

Beside the model's items (params, config, tokenizer) a training checkpoint holds
  train  optimizer state, step and RNG
  data   the Grain iterator state (JSON)
  guard  the numerical guard's host state (JSON)
Saves are asynchronous (training continues while the arrays are written) and atomic, each with an
integrity manifest (model/checkpoint.py). Resuming takes the newest checkpoint that verifies; a torn
or corrupted one is moved aside into `<run>/corrupt_checkpoints/` with a warning naming it.
Retention keeps the last `keep` checkpoints plus every `keep_every`-th step.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from model.checkpoint import abstract_like, checkpoint_manager, intact_step, model_items
from model.config import ConfigError
from train.step import TrainState


def preflight_checkpoint_dir(directory: Path, min_free_mb: int) -> None:
    """Fail before the first step, not at the first save, when checkpoints cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"checkpoint directory {directory} is not writable ({e.strerror or e}); "
                          "fix its permissions or set run.dir to a writable place") from None
    free_mb = shutil.disk_usage(directory).free / 2**20
    if free_mb < min_free_mb:
        raise ConfigError(f"checkpoint directory {directory} has {free_mb:.0f} MB free, less than "
                          f"checkpoint.min_free_mb={min_free_mb}; free space or point run.dir elsewhere")


class Checkpointer:
    """Save and restore `TrainState` + data-iterator state + config + tokenizer, keeping the last
    `keep` plus every `keep_every`-th step, each with an integrity manifest."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, keep_every: int = 0,
                 min_free_mb: int | None = None):
        self.directory = Path(directory).absolute()
        if min_free_mb is not None:
            preflight_checkpoint_dir(self.directory, min_free_mb)
        self.manager = checkpoint_manager(self.directory, keep=keep, keep_every=keep_every, async_save=async_save)

    def latest_intact_step(self) -> int | None:
        """The newest checkpoint that passes verification; newer torn or corrupted ones are moved
        aside (process 0) into `corrupt_checkpoints/` next to the checkpoints directory, with a warning."""
        step = intact_step(self.directory, set_aside=quarantine if jax.process_index() == 0 else None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxlm_checkpoint_verified")
        self.manager.reload()
        return step

    def save(self, step: int, state: TrainState, data_state: dict, config: dict, tokenizer_json: str,
             guard: dict | None = None, meta: dict | None = None) -> None:
        """Start writing checkpoint `step` (returns once the arrays are copied off the devices).
        `guard` is the numerical guard's host state (train/guard.py); `meta` more JSON items by
        name (a LoRA run's `lora`: where its base is, train/lora.py)."""
        extra = {} if guard is None else {"guard": ocp.args.JsonSave(guard)}
        extra.update({name: ocp.args.JsonSave(body) for name, body in (meta or {}).items()})
        self.manager.save(step, args=ocp.args.Composite(
            **model_items(state.params, config, tokenizer_json),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
            data=ocp.args.JsonSave(data_state),
            **extra,
        ), force=True)

    def restore_guard(self, step: int) -> dict:
        """The numerical guard's state saved with `step` ({} for checkpoints written without one)."""
        if not (self.directory / str(step) / "guard").is_dir():
            return {}
        return self.manager.restore(step, args=ocp.args.Composite(guard=ocp.args.JsonRestore()))["guard"]

    def restore(self, step: int, like: TrainState) -> tuple[TrainState, dict]:
        """Restore checkpoint `step` onto the shapes, dtypes and shardings of `like`."""
        train_like = {"step": like.step, "opt_state": like.opt_state, "rng": like.rng}
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_like(like.params)),
            train=ocp.args.StandardRestore(abstract_like(train_like)),
            data=ocp.args.JsonRestore(),
        ))
        t = out["train"]
        # `frozen` (LoRA's base) is never saved: it stays what the run loaded (train/lora.py)
        return TrainState(t["step"], out["params"], t["opt_state"], t["rng"], like.frozen), out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def quarantine(step_dir: Path) -> str:
    """Move a checkpoint that fails verification into `corrupt_checkpoints/` beside the checkpoints
    directory, so nothing ever resumes from it; returns what was done, for the warning."""
    aside = step_dir.parent.parent / "corrupt_checkpoints" / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(step_dir), str(aside))
    return f"; moved to {aside}"
