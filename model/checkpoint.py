"""The model as a file: config + parameters + tokenizer in an Orbax checkpoint.

A checkpoint `<run>/checkpoints/<step>/` holds, at least,
  params     the model parameters (nnx pure dict)
  config     the fully resolved experiment config (JSON): its `model` section rebuilds the model
  tokenizer  the serialized tokenizer (JSON)
so the directory alone rebuilds and serves the model (`load_for_inference`). Training adds its own
items on top (optimizer state, data-iterator state: train/checkpoint.py).

Orbax checksums nothing, so every step committed through `checkpoint_manager` carries
`integrity.json` (size and sha256 of every file), written into the temporary directory just before
Orbax's atomic rename marks the step complete; readers take the newest step whose files still
match (`intact_step`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

log = logging.getLogger(__name__)

INTEGRITY_FILE = "integrity.json"
# Written by Orbax itself after our manifest (commit timestamp, completion marker): not checksummed.
_UNCHECKED = {INTEGRITY_FILE, "_CHECKPOINT_METADATA", atomicity.COMMIT_SUCCESS_FILE}


# ---- integrity ---------------------------------------------------------------------------------

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


def complete_steps(directory: Path) -> list[int]:
    """Steps Orbax marked complete (a final directory name; `*.orbax-checkpoint-tmp*` never counts)."""
    directory = Path(directory)
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) if directory.is_dir() else []


def intact_step(directory: Path, step: int | None = None,
                set_aside: Callable[[Path], str] | None = None) -> int | None:
    """The newest verified step (or `step` itself, when given and intact). Each bad newer checkpoint
    is reported with a warning; `set_aside(step_dir)` (training's quarantine) may move it away and
    returns what it did, for the warning."""
    directory = Path(directory)
    for s in reversed(complete_steps(directory)):
        if step is not None and s != step:
            continue
        problem = verify_checkpoint(directory / str(s))
        if problem is None:
            return s
        done = set_aside(directory / str(s)) if set_aside else ""
        log.warning("skipping checkpoint %s: %s%s", directory / str(s), problem, done)
    return None


# ---- the one Orbax manager factory ------------------------------------------------------------

def checkpoint_manager(directory: str | Path, *, read_only: bool = False, keep: int | None = None,
                       keep_every: int = 0, async_save: bool = False) -> ocp.CheckpointManager:
    """An Orbax manager over `directory` whose commits carry integrity manifests. Writers keep the
    last `keep` steps (None = all) plus every `keep_every`-th; a writer's construction also removes
    the debris of killed writes (`*.orbax-checkpoint-tmp*`)."""
    directory = Path(directory).absolute()
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True)
    else:
        if jax.process_index() == 0:
            remove_torn_writes(directory)
        # Orbax's own cleanup_tmp_directories runs in a background thread that can outlive a
        # command stopped by a user error (a traceback at exit); the synchronous sweep above replaces it.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                               enable_async_checkpointing=async_save, create=True,
                                               temporary_path_class=IntegrityTemporaryPath)
    return ocp.CheckpointManager(directory, options=options)


def remove_torn_writes(directory: Path) -> None:
    """Delete the temporary directories of writes that never committed (a process killed mid-save)."""
    if directory.is_dir():
        for tmp in directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)


def abstract_like(tree):
    """ShapeDtypeStructs (with the arrays' shardings) for restoring onto the same layout."""
    return jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        tree)


def model_items(params, config: dict, tokenizer_json: str) -> dict:
    """The Orbax items every jaxlm checkpoint holds (training adds its own beside them)."""
    return dict(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config),
                tokenizer=ocp.args.JsonSave({"tokenizer": tokenizer_json}))


# ---- reading ------------------------------------------------------------------------------------

def checkpoint_dir(path: str | Path) -> Path:
    """Accept a run directory (with `checkpoints/`) or the checkpoints directory itself."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


def read_checkpoint_meta(path: str | Path, step: int | None = None) -> tuple[int, dict, str]:
    """(step, resolved config dict, tokenizer json) of the latest intact (or the given) checkpoint
    under `path`. Raises FileNotFoundError with a clear message when there is none."""
    directory = checkpoint_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{path}: no such run or checkpoint directory")
    steps = complete_steps(directory)
    if not steps:
        raise FileNotFoundError(f"{path}: no complete checkpoint found in {directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint for step {step}; available: {steps}")
    wanted = step
    step = intact_step(directory, step=step)
    if step is None:
        raise FileNotFoundError(f"{path}: checkpoint {wanted} fails its integrity check" if wanted is not None
                                else f"{path}: no intact checkpoint in {directory} (see the warnings)")
    manager = checkpoint_manager(directory, read_only=True)
    try:
        out = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore(),
                                                            tokenizer=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return step, out["config"], out["tokenizer"]["tokenizer"]


def restore_params(path: str | Path, step: int, like_params: Any) -> Any:
    """Restore only the parameters of checkpoint `step` (no optimizer state) onto `like_params`
    (arrays or ShapeDtypeStructs carrying shardings): each device reads only its shards."""
    manager = checkpoint_manager(checkpoint_dir(path), read_only=True)
    try:
        out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_like(like_params))))
        return out["params"]
    finally:
        manager.close()


class LoadedModel(NamedTuple):
    config: dict  # the resolved experiment config saved with the checkpoint (every section, plain JSON)
    model: Any  # model.transformer.Transformer; its `cfg` is the ModelConfig
    tokenizer: Any  # model.tokenizer.Tokenizer
    step: int


def load_for_inference(path: str | Path, step: int | None = None, sharding: jax.sharding.Sharding | None = None,
                       *, mesh: jax.sharding.Mesh | None = None, rules=None) -> LoadedModel:
    """Rebuild the model and its tokenizer from a checkpoint alone (no other file is read), onto
    `sharding` (default: the first device). Kernels chosen for training change no parameter;
    the model comes back with the jnp implementations, which every device and the KV cache run.

    With `mesh` and logical-axis `rules` (sharding/rules.py) the parameters are split over the mesh
    as training splits them, whatever mesh wrote the checkpoint: each is restored straight onto its
    own NamedSharding, so each device reads only its shards and no host holds the whole model. A
    parameter the mesh cannot split is a ShardingError naming it, before any parameter is read."""
    from flax import nnx

    from model.config import model_config_from_dict
    from model.tokenizer import tokenizer_from_json
    from model.transformer import abstract_model

    from model import lora

    step, config, tokenizer_json = read_checkpoint_meta(path, step)
    model_section = {**config.get("model", {}), "attention": "xla", "matmul": "xla", "norm_impl": "xla"}
    cfg = model_config_from_dict(model_section).validate()
    graphdef, abstract = abstract_model(cfg)
    like = _restore_targets(abstract, sharding, mesh, rules)
    if mesh is not None:  # small trees restored whole (LoRA adapters): replicated over the mesh
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    settings = lora.lora_settings(config)
    if settings is None:
        params = restore_params(path, step, like)
    else:  # a LoRA run's checkpoint holds only adapters: its base + the adapters, folded into the weights
        rank, alpha, targets = settings
        base = _lora_base_params(path, step, config, like, sharding, mesh=mesh, rules=rules)
        adapters = restore_params(path, step, lora.abstract_adapters(cfg, rank, targets, sharding))
        params = lora.merge_adapters(base, adapters, lora.scale_of(rank, alpha))
        if mesh is not None:  # the folded weights on the base's own shardings
            params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, like))
    return LoadedModel(config, nnx.merge(graphdef, params), tokenizer_from_json(tokenizer_json), step)


def _restore_targets(abstract, sharding, mesh, rules) -> dict:
    """The parameters (pure dict) as ShapeDtypeStructs to restore onto: every one on `sharding`
    (default: the first device), or each on the NamedSharding its logical axes give over `mesh`."""
    from flax import nnx

    from model.transformer import state_shardings
    from sharding.rules import validate_state

    shapes = nnx.to_pure_dict(abstract)
    if mesh is None:
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
    if not rules:
        raise ValueError("load_for_inference: a mesh needs its logical-axis rules (sharding.rules.rules_for)")
    validate_state(abstract, mesh.shape, rules)
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh, rules))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _lora_base_params(path, step: int, config: dict, like, sharding, mesh=None, rules=None):
    """The base parameters of LoRA run `path` (pure dict shaped as `like`): the run and step its
    checkpoint's `lora` item recorded (else finetune.init_from), loaded with `load_for_inference`
    (so a base that is itself a LoRA run comes merged). FileNotFoundError / ConfigError naming the
    base when it is gone or no longer fits."""
    from flax import nnx

    from model.config import ConfigError
    from model.lora import parse_base

    record = {}
    if (checkpoint_dir(path) / str(step) / "lora").is_dir():
        manager = checkpoint_manager(checkpoint_dir(path), read_only=True)
        try:
            record = manager.restore(step, args=ocp.args.Composite(lora=ocp.args.JsonRestore()))["lora"]
        finally:
            manager.close()
    init_from = (config.get("finetune") or {}).get("init_from", "")
    base_dir, base_step = record.get("base"), record.get("base_step")
    if not base_dir:
        base_dir, base_step = parse_base(init_from)
    if not base_dir:
        raise ConfigError(f"{path}: a LoRA run (finetune.lora_rank > 0) without its base (finetune.init_from)")
    if not Path(base_dir).is_dir():
        raise FileNotFoundError(f"{path}: the LoRA run's base {base_dir} (finetune.init_from={init_from!r}) "
                                "is not there; its checkpoint holds only the adapters")
    base = nnx.to_pure_dict(nnx.state(load_for_inference(base_dir, base_step, sharding, mesh=mesh,
                                                         rules=rules).model))
    base = _grow_vocab(base, like)
    want = jax.tree.map(lambda x: (x.shape, str(x.dtype)), like)
    have = jax.tree.map(lambda x: (x.shape, str(x.dtype)), base)
    if want != have:
        raise ConfigError(f"{path}: the base {base_dir} (step {base_step}) no longer matches the LoRA run's "
                          "model section (parameter shapes differ)")
    return base


# parameters with a vocabulary axis, and which axis it is (model/transformer.py)
_VOCAB_AXES = {"embed": 0, "lm_head": 1}


def _grow_vocab(base: dict, like) -> dict:
    """`base` with the vocabulary axis of its embedding / output head grown to `like`'s, each new
    row the mean of the trained ones: the rule train/finetune.grow_vocab applied to the LoRA run's
    frozen base when its tokenizer added tokens (chat control tokens), repeated here because a LoRA
    checkpoint saves only the adapters (tests/train/test_lora.py checks the two agree)."""
    out = dict(base)
    for name, axis in _VOCAB_AXES.items():
        if base.get(name) is None or like.get(name) is None or base[name].shape[axis] >= like[name].shape[axis]:
            continue
        old = base[name]
        reps = [1] * old.ndim
        reps[axis] = like[name].shape[axis] - old.shape[axis]
        mean = jnp.mean(old, axis=axis, keepdims=True)  # (1, D) or (D, 1)
        out[name] = jnp.concatenate([old, jnp.tile(mean, reps)], axis=axis).astype(old.dtype)
    return out


# ---- writing a model-only checkpoint -----------------------------------------------------------

def save_model(directory: str | Path, step: int, params, config: dict, tokenizer_json: str) -> None:
    """Write checkpoint `step` with only the model's items (params, config, tokenizer), committed
    like a training checkpoint (integrity manifest, atomic rename): what `python -m infer import-hf`
    produces and `load_for_inference` reads."""
    manager = checkpoint_manager(directory)
    try:
        manager.save(step, args=ocp.args.Composite(**model_items(jax.tree.map(jnp.asarray, params), config,
                                                                 tokenizer_json)), force=True)
        manager.wait_until_finished()
    finally:
        manager.close()
