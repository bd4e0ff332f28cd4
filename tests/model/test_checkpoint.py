"""The model as a file (model/checkpoint.py): what a checkpoint holds rebuilds the model alone,
and checkpoints written before the model-as-a-file code moved out of train/ still load and resume.

tests/fixtures/legacy_run is a run directory written by commit cab9521 (the code before the move):
`python -m train experiments/quickstart.yaml` with a 1-layer d_model=32 llama, byte tokens,
data.max_chars=20000, 4 steps, its tokens/ and tensorboard/ dropped. Its summary.json carries the
final parameters' sha256, which loading must reproduce bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from model import build_model, preset
from model.checkpoint import (LoadedModel, checkpoint_dir, load_for_inference, read_checkpoint_meta, save_model,
                              verify_checkpoint)
from model.tokenizer import ByteTokenizer

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_run"


def test_a_checkpoint_written_before_the_move_loads_bit_identical():
    summary = json.loads((LEGACY / "summary.json").read_text())
    from train.run_files import params_sha256

    loaded = load_for_inference(LEGACY)
    assert isinstance(loaded, LoadedModel) and loaded.step == 4
    assert params_sha256(nnx.to_pure_dict(nnx.state(loaded.model))) == summary["params_sha256"]
    assert loaded.config["data"]["tokenizer"] == "byte" and loaded.tokenizer.kind == "byte"
    assert loaded.model.cfg.n_layers == 1 and loaded.model.cfg.vocab_size == 257


def test_a_checkpoint_written_before_the_move_resumes_training(tmp_path):
    from train.config import load_config
    from train.loop import train

    run = tmp_path / "legacy_run"
    shutil.copytree(LEGACY, run)
    summary = train(load_config(run / "config.yaml", [f"run.dir={run}", "train.steps=6", "train.sample_tokens=0",
                                                         "mesh.num_devices=1"]))
    assert summary["resumed_from_step"] == 4 and summary["step"] == 6
    assert np.isfinite(summary["val_loss"])
    assert load_for_inference(run).step == 6


def test_save_model_round_trip_with_integrity(tmp_path):
    model = build_model(preset("gpt2-nano", vocab_size=257, n_layers=1, d_model=32, n_heads=2), seed=3)
    params = nnx.to_pure_dict(nnx.state(model))
    config = {"model": {**{k: getattr(model.cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads")},
                        "preset": "gpt2-nano"}}
    save_model(tmp_path / "checkpoints", 7, params, config, ByteTokenizer().to_json())
    assert checkpoint_dir(tmp_path) == tmp_path / "checkpoints"
    assert verify_checkpoint(tmp_path / "checkpoints" / "7") is None
    step, saved, tok = read_checkpoint_meta(tmp_path)
    assert (step, saved, json.loads(tok)) == (7, config, {"kind": "byte"})
    loaded = load_for_inference(tmp_path)
    assert loaded.model.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.to_pure_dict(nnx.state(loaded.model)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_and_unknown_steps_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such run or checkpoint directory"):
        load_for_inference(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_for_inference(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 9; available: \[4\]"):
        load_for_inference(LEGACY, step=9)
