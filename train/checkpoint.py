"""Orbax checkpoints: the model becomes a file.

A checkpoint `<run>/checkpoints/<step>/` holds five items:
  params     the model parameters (nnx pure dict)           -- all that inference restores
  train      optimizer state, step and RNG                  -- with params: exact resume
  data       the Grain iterator state (JSON)
  config     the fully resolved experiment config (JSON)    -- rebuilds the model
  tokenizer  the serialized tokenizer (JSON)                -- decodes samples
so a checkpoint directory alone is enough to rebuild, resume or serve the model. Saves are
asynchronous (training continues while the arrays are written) and atomic: Orbax writes into a
temporary directory and marks the step complete only when every item is on disk.

Integrity (Orbax checksums nothing): just before Orbax marks a step complete (the rename of its
temporary directory), `integrity.json` is written into it with the size and sha256 of every file.
Resuming picks the newest checkpoint whose files still match (`latest_intact_step`); a torn or
corrupted one is moved aside into `<run>/corrupt_checkpoints/` with a warning naming it, and the
previous good one is used. Retention keeps the last `keep` checkpoints plus every `keep_every`-th step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from train.config import ConfigError
from train.step import TrainState

log = logging.getLogger(__name__)


def _abstract(tree):
    """ShapeDtypeStructs (with the arrays' shardings) for restoring onto the same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


INTEGRITY_FILE = "integrity.json"
# Written by Orbax itself after our manifest (commit timestamp, completion marker): not checksummed.
_UNCHECKED = {INTEGRITY_FILE, "_CHECKPOINT_METADATA", atomicity.COMMIT_SUCCESS_FILE}


def _file_digests(root: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in _UNCHECKED:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    return out


def write_integrity_manifest(step_dir: Path) -> None:
    """Checksum every file of a finished checkpoint into `integrity.json` (fsynced)."""
    path = Path(step_dir) / INTEGRITY_FILE
    with path.open("w") as f:
        json.dump({"files": _file_digests(Path(step_dir))}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(step_dir: Path) -> str | None:
    """None when every file listed in the manifest is present with its size and checksum, else why not."""
    step_dir = Path(step_dir)
    manifest = step_dir / INTEGRITY_FILE
    if not manifest.is_file():
        return f"no {INTEGRITY_FILE} (the write never completed)"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{INTEGRITY_FILE} is unreadable"
    if not expected:
        return f"{INTEGRITY_FILE} lists no files"
    for rel, want in expected.items():
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {want['size']} (truncated?)"
    actual = _file_digests(step_dir)
    for rel, want in expected.items():
        if actual[rel]["sha256"] != want["sha256"]:
            return f"{rel} fails its sha256 check (corrupted)"
    return None


class IntegrityTemporaryPath(atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic-rename commit, with `integrity.json` written into the temporary directory
    first: a step that Orbax lists as complete always carries its manifest."""

    async def finalize(self, *args, **kwargs):
        if self.get_final().name.isdigit():  # a step directory, not one of its items
            write_integrity_manifest(Path(os.fspath(self.get())))
        return await super().finalize(*args, **kwargs)


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
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                               enable_async_checkpointing=async_save, create=True,
                                               temporary_path_class=IntegrityTemporaryPath,
                                               cleanup_tmp_directories=True)  # debris of killed writes
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def latest_intact_step(self) -> int | None:
        """The newest checkpoint that passes verification; newer torn or corrupted ones are moved
        aside (process 0) into `corrupt_checkpoints/` next to the checkpoints directory, with a warning."""
        step = intact_step(self.directory, quarantine=jax.process_index() == 0)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxlm_checkpoint_verified")
        self.manager.reload()
        return step

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, config: dict, tokenizer_json: str,
             guard: dict | None = None) -> None:
        """Start writing checkpoint `step` (returns once the arrays are copied off the devices).
        `guard` is the numerical guard's host state (train/guard.py)."""
        extra = {} if guard is None else {"guard": ocp.args.JsonSave(guard)}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.JsonSave({"tokenizer": tokenizer_json}),
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
            params=ocp.args.StandardRestore(_abstract(like.params)),
            train=ocp.args.StandardRestore(_abstract(train_like)),
            data=ocp.args.JsonRestore(),
        ))
        t = out["train"]
        return TrainState(t["step"], out["params"], t["opt_state"], t["rng"]), out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def save_inference_checkpoint(directory: str | Path, step: int, params, config: dict, tokenizer_json: str) -> None:
    """Write checkpoint `step` with only the items `load_for_inference` reads (params, config,
    tokenizer), committed like a training checkpoint (integrity manifest, atomic rename): what
    `python -m infer import-hf` produces."""
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           temporary_path_class=IntegrityTemporaryPath)
    manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
    try:
        manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(jax.tree.map(jnp.asarray, params)),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.JsonSave({"tokenizer": tokenizer_json}),
        ), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()


def _complete_steps(directory: Path) -> list[int]:
    """Steps Orbax marked complete (a final directory name; `*.orbax-checkpoint-tmp*` never counts)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) if directory.is_dir() else []


def intact_step(directory: Path, quarantine: bool = False, step: int | None = None) -> int | None:
    """The newest verified step (or `step` itself, when given and intact). Bad newer checkpoints are
    reported and, with `quarantine`, moved to `corrupt_checkpoints/` so nothing ever resumes from them."""
    directory = Path(directory)
    candidates = [s for s in reversed(_complete_steps(directory)) if step is None or s == step]
    for s in candidates:
        problem = verify_checkpoint(directory / str(s))
        if problem is None:
            return s
        where = ""
        if quarantine:
            aside = directory.parent / "corrupt_checkpoints" / f"{s}-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(directory / str(s)), str(aside))
            where = f"; moved to {aside}"
        log.warning("skipping checkpoint %s: %s%s", directory / str(s), problem, where)
    return None


def checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory (with `checkpoints/`) or the checkpoints directory itself."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


def read_checkpoint_meta(path: str | Path, step: int | None = None) -> tuple[int, dict, str]:
    """(step, resolved config dict, tokenizer json) of the latest (or given) checkpoint under `path`.
    Raises FileNotFoundError with a clear message when there is none."""
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    manager = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"{path}: no complete checkpoint found in {directory}")
        if step is not None and step not in steps:
            raise FileNotFoundError(f"{path}: no checkpoint for step {step}; available: {sorted(steps)}")
        wanted = step
        step = intact_step(directory, step=step)
        if step is None:
            raise FileNotFoundError(f"{path}: checkpoint {wanted} fails its integrity check" if wanted is not None
                                    else f"{path}: no intact checkpoint in {directory} (see the warnings)")
        out = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                            tokenizer=ocp.args.JsonRestore()))
        return step, out["config"], out["tokenizer"]["tokenizer"]
    finally:
        manager.close()


def restore_params(path: str | Path, step: int, like_params: Any) -> Any:
    """Restore only the parameters of checkpoint `step` (no optimizer state) onto `like_params`
    (arrays or ShapeDtypeStructs carrying shardings)."""
    directory = checkpoint_dir(path)
    manager = ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        target = jax.tree.map(
            lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            like_params)
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return out["params"]
    finally:
        manager.close()


def load_for_inference(path: str | Path, step: int | None = None):
    """Rebuild (config, model, tokenizer, step) from a checkpoint alone: no other file is read."""
    from flax import nnx

    from model.transformer import Transformer
    from train.config import from_dict
    from train.data import tokenizer_from_json

    step, config_dict, tokenizer_json = read_checkpoint_meta(path, step)
    cfg = from_dict(config_dict)
    # Kernels chosen for training change no parameter; inference (KV cache, any device) runs the
    # jnp implementations, and `python -m infer` applies its own --attention / --matmul choice.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="xla", matmul="xla",
                                                             norm_impl="xla"))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def init():
        with nnx.use_eager_sharding(False):
            return Transformer(cfg.model, rngs=nnx.Rngs(0))

    graphdef, abstract = nnx.split(nnx.eval_shape(init))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(abstract))
    params = restore_params(path, step, like)
    return cfg, nnx.merge(graphdef, params), tokenizer_from_json(tokenizer_json), step
