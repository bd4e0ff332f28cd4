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
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.step import TrainState

log = logging.getLogger(__name__)


def _abstract(tree):
    """ShapeDtypeStructs (with the arrays' shardings) for restoring onto the same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
    """Save and restore `TrainState` + data-iterator state + config + tokenizer, keeping the last K."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, data_state: dict, config: dict, tokenizer_json: str) -> None:
        """Start writing checkpoint `step` (returns once the arrays are copied off the devices)."""
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.JsonSave({"tokenizer": tokenizer_json}),
        ), force=True)

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
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise FileNotFoundError(f"{path}: no checkpoint for step {step}; available: {sorted(steps)}")
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
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def init():
        with nnx.use_eager_sharding(False):
            return Transformer(cfg.model, rngs=nnx.Rngs(0))

    graphdef, abstract = nnx.split(nnx.eval_shape(init))
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(abstract))
    params = restore_params(path, step, like)
    return cfg, nnx.merge(graphdef, params), tokenizer_from_json(tokenizer_json), step
