"""The experiment config: YAML overrides, command-line overrides, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.expectations import is_routing_policy
from train.config import ConfigError, ExperimentConfig, from_dict, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
# every training recipe (the routing policy experiments/hybrid.yaml is not one)
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml") if not is_routing_policy(p))


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.path == Path("runs/run")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_loads_and_validates(path):
    cfg = load_config(path)
    text = path.read_text()
    # Each recipe starts with a header saying how to run it and what to expect.
    header = text.split("\n\n")[0]
    for word in ("command", "hardware", "time", "expected"):
        assert word in header.lower(), f"{path.name} header lacks {word!r}"
    assert cfg.run.name == path.stem


def test_experiments_exist():
    names = {p.name for p in EXPERIMENTS}
    assert {"quickstart.yaml", "shakespeare_char_cpu.yaml", "shakespeare_char.yaml"} <= names


def test_shakespeare_char_cpu_is_nanogpts_baby_gpt():
    cfg = load_config(ROOT / "experiments/shakespeare_char_cpu.yaml")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.n_layers, m.n_heads, m.d_model, m.dropout) == (4, 4, 128, 0.0)
    assert (m.norm, m.positions, m.mlp, m.bias, m.tie_embeddings) == ("layernorm", "learned", "gelu", True, True)
    # issue 7: the CPU kernels, two slices side by side
    assert (m.attention, m.matmul, m.norm_impl, t.batch_splits) == ("cpu", "cpu", "cpu", 2)
    assert (d.tokenizer, d.seq_len, d.source, t.batch_size, t.steps) == ("char", 64, "tinyshakespeare", 12, 2000)
    assert (o.lr, o.min_lr, o.warmup_steps, o.decay_steps) == (1e-3, 1e-4, 100, 2000)
    assert (o.beta1, o.beta2, o.weight_decay, o.clip_norm) == (0.9, 0.99, 0.1, 1.0)


def test_yaml_then_overrides_then_preset(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("model:\n  preset: llama-tiny\n  n_layers: 3\ntrain:\n  steps: 7\n")
    cfg = load_config(p, ["train.steps=9", "optim.lr=3e-4", "model.d_model=64", "checkpoint.async_save=false"])
    assert cfg.model.n_layers == 3 and cfg.model.d_model == 64 and cfg.model.norm == "rmsnorm"
    assert cfg.train.steps == 9 and cfg.optim.lr == 3e-4 and cfg.checkpoint.async_save is False


def test_seq_len_defaults_to_the_model_context():
    assert load_config(None, ["model.preset=gpt2-nano"]).data.seq_len == 64
    assert load_config(None, ["model.preset=gpt2-nano", "data.seq_len=32"]).data.seq_len == 32


def test_resolved_config_round_trips():
    cfg = load_config(None, ["model.preset=gpt2-nano", "train.steps=3"])
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "unknown key train.stepz; allowed:"),
    ("trian.steps=3", "unknown section 'trian'"),
    ("train.steps=many", "train.steps='many' must be an integer"),
    ("train.steps=-1", "train.steps=-1"),
    ("optim.lr=fast", "optim.lr='fast' must be a number"),
    ("model.norm=batchnorm", "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
    ("model.preset=gpt5", "model.preset='gpt5' is not one of"),
    ("data.tokenizer=words", "data.tokenizer='words' is not one of byte, char, bpe"),
    ("mesh.data=0", "mesh.data=0"),
    ("checkpoint.async_save=maybe", "must be true or false"),
    ("data.seq_len=512", "data.seq_len=512 exceeds model.max_seq_len=256"),
    ("data.seq_len=-1", "data.seq_len=-1 must be a positive integer"),
    ("steps=3", "must look like section.key=value"),
    ("train.batch_splits=0", "train.batch_splits=0 must be >= 1"),
    ("model.norm_impl=fused", "model.norm_impl='fused' is not one of xla, cpu"),
    ("train.batch_splits=5", "train.batch_size / optim.grad_accum = 32 must be divisible by train.batch_splits=5"),
])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_files(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("training:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown section 'training'"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_parse_override_types():
    assert parse_override("train.steps=10") == ("train", "steps", 10)
    assert parse_override("optim.lr=1e-3")[2] == 1e-3 or parse_override("optim.lr=1e-3")[2] == "1e-3"
    assert parse_override("data.path=/a/b=c.txt") == ("data", "path", "/a/b=c.txt")


def test_cli_bad_key_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train", str(ROOT / "experiments/quickstart.yaml"), "train.stepz=3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "unknown key train.stepz" in r.stderr and "Traceback" not in r.stderr
