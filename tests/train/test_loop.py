"""End-to-end behaviour of a training run: the loss goes down, the run directory holds what
DESIGN.md promises, and an interrupted run resumes from its checkpoint to the same result."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train.config import ConfigError, load_config
from model.checkpoint import load_for_inference
from train.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[2]


def corpus(tmp_path: Path) -> Path:
    """A small text with learnable structure (repeated words in a fixed grammar)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "self", "value", "(", ")", ":"]
    lines = [" ".join(rng.choice(words, size=8)) + "\n" for _ in range(600)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path


def tiny_config(tmp_path: Path, name: str, *extra: str):
    return load_config(None, [
        "model.preset=gpt2-nano", "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32",
        "data.source=files", f"data.path={corpus(tmp_path)}", "data.tokenizer=byte", "data.seq_len=32",
        "train.batch_size=8", "train.steps=16", "train.log_every=2", "train.eval_every=8", "train.eval_batches=2",
        "train.sample_tokens=16", "train.progress=false", "optim.warmup_steps=2", "optim.lr=3e-3",
        "checkpoint.every=4", "checkpoint.keep=2", f"run.dir={tmp_path / name}", *extra,
    ])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    summary = train(tiny_config(tmp, "run"))
    return tmp / "run", summary


def test_tiny_run_lowers_the_loss(uninterrupted):
    run_dir, summary = uninterrupted
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert summary["val_loss"] < losses[0] - 1.0


def test_run_directory_contents(uninterrupted):
    run_dir, summary = uninterrupted
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "samples.txt", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # keep=2: only the last two checkpoints remain, the final one included.
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [12, 16]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"git", "packages", "devices", "data", "seed"} <= set(manifest)
    assert len(manifest["data"]["fingerprint"]) == 64 and manifest["packages"]["jax"]

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == list(range(2, 17, 2))
    for r in logged:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s"} <= set(r)
    assert [r["step"] for r in records if "val_loss" in r and "loss" in r] == [8, 16]

    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert {"step", "val_loss", "wall_time_s", "tokens_per_s", "params_sha256"} <= set(on_disk)
    assert on_disk["step"] == 16


def test_resolved_config_rebuilds_the_run(uninterrupted):
    run_dir, _ = uninterrupted
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.model.vocab_size == 257  # filled in from the byte tokenizer
    assert cfg.train.steps == 16


def test_same_seed_same_parameters(uninterrupted, tmp_path):
    _, summary = uninterrupted
    # as `python -m train` runs it (JAX's caches dropped after the set-up): the same parameters
    again = train(tiny_config(tmp_path, "again"), whole_process=True)
    assert again["params_sha256"] == summary["params_sha256"]
    other = train(tiny_config(tmp_path, "other_seed", "train.seed=1", "train.steps=4", "train.sample_tokens=0"))
    assert other["params_sha256"] != summary["params_sha256"]


class Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_at_its_checkpoint_and_matches(uninterrupted, tmp_path):
    """A run that dies during step 11 restarts from checkpoint 8 and ends bit-identical to a run
    that was never interrupted (parameters, optimizer state, RNG and data order all restored)."""
    _, reference = uninterrupted
    cfg = tiny_config(tmp_path, "crashy")
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def crashing_step(state, batch):
        if int(state.step) == 10:
            raise Crash("simulated failure")
        return real_step(state, batch)

    trainer.train_step = crashing_step
    with pytest.raises(Crash):
        try:
            trainer.run()
        finally:
            trainer.close()

    resumed = Trainer(cfg)
    assert resumed.resume_step == 8 and int(resumed.state.step) == 8
    try:
        summary = resumed.run()
    finally:
        resumed.close()
    assert summary["resumed_from_step"] == 8
    assert summary["params_sha256"] == reference["params_sha256"]


def test_resume_with_a_different_model_is_refused(uninterrupted, tmp_path):
    run_dir, _ = uninterrupted
    cfg = load_config(run_dir / "config.yaml", ["model.n_layers=3"])
    with pytest.raises(ConfigError, match="cannot resume.*model.n_layers"):
        Trainer(cfg)


def test_cli_resumes_a_run_directory_and_extends_it(uninterrupted, tmp_path):
    import shutil

    src, _ = uninterrupted
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    r = subprocess.run([sys.executable, "-m", "train", str(run_dir), "train.steps=20", "train.progress=false",
                        "train.sample_tokens=0"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 20 and summary["resumed_from_step"] == 16
    assert "done: step 20" in r.stdout


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="the XLA:CPU attention kernel")
def test_run_with_the_cpu_kernels(uninterrupted, tmp_path):
    """model.attention / matmul / norm_impl = cpu train to the loss of the jnp model (float32
    rounding apart) and still write samples (the sampler's KV-cache path switches to the jnp
    attention); the checkpoint loads for inference with the jnp implementations. They run on one
    device: `python -m train` in a process with one CPU device (as on
    any machine without XLA_FLAGS); here, with the suite's eight, a mesh of several is a config
    error before any work."""
    _, reference = uninterrupted
    experiment = tmp_path / "cpu.yaml"
    kernels = ("model.attention=cpu", "model.matmul=cpu", "model.norm_impl=cpu")
    experiment.write_text(tiny_config(tmp_path, "cpu", *kernels).to_yaml())
    env = {**os.environ, "XLA_FLAGS": ""}
    r = subprocess.run([sys.executable, "-m", "train", str(experiment)], capture_output=True, text=True, cwd=ROOT,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert abs(summary["val_loss"] - reference["val_loss"]) < 1e-3, (summary["val_loss"], reference["val_loss"])
    assert (tmp_path / "cpu" / "samples.txt").read_text().strip()
    _, model, _, _ = load_for_inference(tmp_path / "cpu" / "checkpoints")
    assert (model.cfg.attention, model.cfg.matmul, model.cfg.norm_impl) == ("xla", "xla", "xla")
    if len(jax.devices()) > 1:
        with pytest.raises(ConfigError, match="model.attention='cpu' is a one-device kernel"):
            Trainer(tiny_config(tmp_path, "cpu-mesh", "model.attention=cpu"))
        with pytest.raises(ConfigError, match="model.matmul='cpu' is a one-device kernel"):
            Trainer(tiny_config(tmp_path, "cpu-mesh2", "model.matmul=cpu"))
        with pytest.raises(ConfigError, match="model.norm_impl='cpu' is a one-device kernel"):
            Trainer(tiny_config(tmp_path, "cpu-mesh3", "model.norm_impl=cpu"))


def test_a_data_error_found_after_the_checkpoint_manager_exists_is_one_line(tmp_path):
    """The data is read after the run's checkpoint manager is open; the user's mistake must still be
    the only thing on stderr besides the progress log (no thread traceback from Orbax at exit)."""
    r = subprocess.run([sys.executable, "-m", "train", str(ROOT / "experiments" / "quickstart.yaml"),
                        "data.source=files", f"data.path={tmp_path / 'nonexistent.txt'}", f"run.dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if not line.startswith("INFO ")]
    assert lines == [f"error: data.path='{tmp_path / 'nonexistent.txt'}' does not exist (a file, directory or glob "
                     "is allowed)"]
