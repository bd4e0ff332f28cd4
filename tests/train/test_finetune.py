"""Fine-tuning from a checkpoint (train/finetune.py): the new run starts from the source's exact
parameters (one device and an 8-device FSDP mesh), chat tokens grow the vocabulary with mean rows, and
a model config that does not match the checkpoint is one line naming the keys."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from model.checkpoint import save_model
from model.config import ConfigError, preset
from model.tokenizer import ByteTokenizer
from model.transformer import build_model
from train.config import load_config
from train.finetune import Source, check_model_matches, load_source
from train.loop import Trainer

MODEL = ["model.preset=llama-tiny", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
         "model.d_ff=64"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A model-only checkpoint (what `python -m infer import-hf` writes) at step 7, and its parameters."""
    d = tmp_path_factory.mktemp("finetune")
    cfg = load_config(None, MODEL + ["model.max_seq_len=32", "model.vocab_size=257", "data.tokenizer=byte"])
    params = nnx.to_pure_dict(nnx.state(build_model(cfg.model, seed=3)))
    save_model(d / "src" / "checkpoints", 7, params, cfg.to_dict(), ByteTokenizer().to_json())
    (d / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 40)
    chat = [{"messages": [{"role": "user", "content": f"add {i}"}, {"role": "assistant", "content": f"return {i}"}]}
            for i in range(24)]
    (d / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    return d, jax.tree.map(np.asarray, params)


def trainer_for(d, name, overrides):
    cfg = load_config(None, MODEL + [f"finetune.init_from={d / 'src'}", f"run.dir={d / name}", "train.steps=2",
                                     "train.batch_size=8", "train.eval_every=0", "train.sample_tokens=0",
                                     "train.progress=false", "mesh.data=-1"] + overrides)
    return Trainer(cfg)


@pytest.mark.parametrize("fsdp", [1, 8])
def test_init_from_restores_the_source_parameters_bit_identical(source, fsdp):
    d, params = source
    t = trainer_for(d, f"text{fsdp}", ["model.max_seq_len=32", "data.source=files", f"data.path={d / 'text.txt'}",
                                        f"mesh.fsdp={fsdp}"])
    try:
        assert int(t.state.step) == 0
        jax.tree.map(lambda new, old: np.testing.assert_array_equal(np.asarray(new), old), t.state.params, params)
        # a fresh optimizer: Adam's moments and counts all zero
        assert all(not np.asarray(x).any() for x in jax.tree.leaves(t.state.opt_state))
        embed = t.state.params["embed"]
        assert embed.sharding.mesh.shape["fsdp"] == fsdp and len(embed.sharding.device_set) == t.mesh.size
        if fsdp == 8:  # each device holds its shard only
            assert embed.addressable_shards[0].data.shape[1] == 32 // 8
        assert t.data.tokenizer.to_json() == ByteTokenizer().to_json()  # the source's tokenizer came along
    finally:
        t.close()


def test_chat_fine_tuning_grows_the_vocabulary_with_mean_rows_on_a_mesh_and_trains(source):
    d, params = source
    t = trainer_for(d, "chat", ["model.max_seq_len=64", "data.source=chat_jsonl", f"data.path={d / 'chat.jsonl'}",
                                "mesh.fsdp=8"])
    try:
        assert t.cfg.model.vocab_size == 259 and t.cfg.model.max_seq_len == 64  # +2 chat tokens; RoPE context x2
        embed, head = np.asarray(t.state.params["embed"]), np.asarray(t.state.params["lm_head"])
        np.testing.assert_array_equal(embed[:257], params["embed"])
        np.testing.assert_array_equal(head[:, :257], params["lm_head"])
        # float32 means of 257 values, summed in another order than numpy's: 1e-8 absolute (values ~1e-3)
        np.testing.assert_allclose(embed[257:], np.broadcast_to(params["embed"].mean(0), (2, 32)), atol=1e-8)
        np.testing.assert_allclose(head[:, 257:], np.broadcast_to(params["lm_head"].mean(1)[:, None], (32, 2)),
                                   atol=1e-8)
        summary = t.run()
    finally:
        t.close()
    assert np.isfinite(summary["init_val_loss"]) and np.isfinite(summary["val_loss"])
    first = json.loads((d / "chat" / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "val_loss": summary["init_val_loss"]}  # the base model on the SFT validation split


def test_a_mismatched_model_config_is_one_line_naming_the_keys(source):
    d, _ = source
    cmd = [sys.executable, "-m", "train", "experiments/quickstart.yaml", f"finetune.init_from={d / 'src'}",
           f"run.dir={d / 'mismatch'}", "data.source=files", f"data.path={d / 'text.txt'}", "model.max_seq_len=32",
           "data.seq_len=32"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    # quickstart's llama-tiny is d_model 128, 4 layers, 4 heads (2 kv), d_ff 384; the checkpoint's 32/2/2/1/64
    for key in ("model.d_model: checkpoint 32, config 128", "model.n_layers: checkpoint 2, config 4",
                "model.n_heads", "model.n_kv_heads", "model.d_ff"):
        assert key in lines[0]
    assert "model.norm" not in lines[0] and "model.positions" not in lines[0]  # those match


def test_learned_positions_cannot_grow_but_rope_context_can():
    learned = preset("gpt2-nano", vocab_size=300)
    src = Source("runs/x", None, 0, {}, learned, ByteTokenizer())
    with pytest.raises(ConfigError, match=r"model.max_seq_len: checkpoint 64, config 128 \(learned positions"):
        check_model_matches(preset("gpt2-nano", max_seq_len=128), src, 257)
    with pytest.raises(ConfigError, match="model.vocab_size: checkpoint 300, config 299"):
        check_model_matches(preset("gpt2-nano", vocab_size=299), src, 257)
    rope = Source("runs/x", None, 0, {}, preset("llama-tiny", vocab_size=2048), ByteTokenizer())
    grown = check_model_matches(preset("llama-tiny", max_seq_len=1024, attention="xla", dropout=0.1), rope, 2050)
    assert grown.vocab_size == 2050 and grown.max_seq_len == 1024


def test_init_from_names_a_missing_run_or_step(source, tmp_path):
    d, _ = source
    with pytest.raises(ConfigError, match="finetune.init_from=.*no such run"):
        load_source(load_config(None, [f"finetune.init_from={tmp_path / 'nope'}"]).finetune)
    with pytest.raises(ConfigError, match=r"no checkpoint for step 3; available: \[7\]"):
        load_source(load_config(None, [f"finetune.init_from={d / 'src'}@3"]).finetune)
    assert load_source(load_config(None, [f"model.init_from={d / 'src'}@7"]).finetune).step == 7  # the alias


def test_finetune_section_validates():
    assert load_config(None, ["model.init_from=runs/a"]).finetune.init_from == "runs/a"
    for bad, match in (("finetune.lora_targets=q,x", "finetune.lora_targets"), ("finetune.lora_rank=-1", "lora_rank"),
                       ("finetune.max_bad_fraction=2", "max_bad_fraction"), ("finetune.nope=1", "unknown key")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="disagree"):
        load_config(None, ["model.init_from=runs/a", "finetune.init_from=runs/b"])
    with pytest.raises(ConfigError, match="only model.attention='xla'"):
        load_config(None, ["data.source=stdlib_chat", "model.attention=cpu"])
