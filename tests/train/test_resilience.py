"""Training survives what clusters do to it: SIGKILL at any moment, SIGTERM preemption, torn or
corrupted checkpoints, non-finite numbers, and a checkpoint directory it cannot write.

The subprocess tests share one uninterrupted reference run (in a subprocess, 1 CPU device, with a
persistent compilation cache that the restarts then reuse) and compare `params_sha256` with it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.chaos import _command, compile_cache_env, run_chaos
from model.checkpoint import intact_step, load_for_inference, verify_checkpoint
from train.checkpoint import Checkpointer
from train.config import ConfigError, load_config
from train.guard import SPIKE_WARMUP_STEPS, NonFiniteLossError, NumericalGuard
from train.loop import Trainer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40


def write_corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "self", "value", "(", ")", ":"]
    path.write_text("".join(" ".join(rng.choice(words, size=8)) + "\n" for _ in range(300)))
    return path


def tiny_overrides(corpus: Path, *extra: str) -> list[str]:
    return ["model.preset=gpt2-nano", "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
            "model.max_seq_len=16", "data.source=files", f"data.path={corpus}", "data.tokenizer=byte",
            "data.seq_len=16", "train.batch_size=8", f"train.steps={STEPS}", "train.log_every=1",
            "train.eval_every=0", "train.sample_tokens=0", "train.progress=false", "optim.warmup_steps=2",
            "optim.lr=3e-3", "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=10",
            "checkpoint.min_free_mb=1", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp dir, experiment YAML, overrides, subprocess env, finished reference run dir)."""
    tmp = tmp_path_factory.mktemp("resilience")
    experiment = tmp / "empty.yaml"
    experiment.write_text("{}\n")
    overrides = tiny_overrides(write_corpus(tmp / "corpus.txt"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1",
               **compile_cache_env(tmp / "jax_cache"))
    ref = tmp / "reference"
    r = subprocess.run(_command(str(experiment), overrides, ref), env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, experiment, overrides, env, ref


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_retention_keeps_last_k_plus_every_mth_each_with_a_manifest(setup):
    *_, ref = setup
    ckpt = ref / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir()) == [10, 20, 30, 38, 40]
    for step in (10, 20, 30, 38, 40):
        assert verify_checkpoint(ckpt / str(step)) is None
        assert (ckpt / str(step) / "integrity.json").is_file()


def test_chaos_sigkill_at_random_moments_ends_bit_identical(setup):
    """10 SIGKILLs (seeded random moments: during start-up, after a step, during an asynchronous
    checkpoint write), a restart after each, and the final parameters equal the uninterrupted run's."""
    tmp, experiment, overrides, env, ref = setup
    result = run_chaos(str(experiment), overrides, tmp / "chaos", kills=10, seed=0, env=env, compile_cache=False,
                       reference=ref)  # prints one line per kill (shown on failure)
    assert len(result["kills"]) == 10, result
    assert result["during_write"] >= 1, result
    assert result["chaos_sha256"] == summary(ref)["params_sha256"], result
    assert result["match"]


def test_sigterm_saves_exits_zero_and_the_restart_continues(setup):
    tmp, experiment, overrides, env, ref = setup
    run_dir = tmp / "preempted"
    cmd = _command(str(experiment), overrides + ["checkpoint.every=0"], run_dir)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted (SIGTERM): saved step" in out and "s from signal to exit" in out, out
    saved = [int(p.name) for p in (run_dir / "checkpoints").iterdir()]
    assert len(saved) == 1 and 3 <= saved[0] < STEPS  # checkpoint.every=0: only the preemption save
    assert verify_checkpoint(run_dir / "checkpoints" / str(saved[0])) is None
    assert not (run_dir / "summary.json").exists()

    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary(run_dir)["resumed_from_step"] == saved[0]
    assert summary(run_dir)["params_sha256"] == summary(ref)["params_sha256"]


@pytest.fixture
def damaged_copy(setup, tmp_path):
    *_, ref = setup
    run_dir = tmp_path / "run"
    shutil.copytree(ref, run_dir)
    return run_dir, run_dir / "checkpoints"


def latest_intact(ckpt: Path) -> int | None:
    checkpointer = Checkpointer(ckpt)
    try:
        return checkpointer.latest_intact_step()
    finally:
        checkpointer.close()


def biggest_file(step_dir: Path) -> Path:
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != "integrity.json"]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "delete_a_file", "no_manifest"])
def test_a_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restored(damaged_copy, damage, caplog):
    run_dir, ckpt = damaged_copy
    latest = ckpt / "40"
    victim = biggest_file(latest)
    if damage == "flip_a_byte":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "delete_a_file":
        victim.unlink()
    else:
        (latest / "integrity.json").unlink()

    assert verify_checkpoint(latest) is not None
    # Inference (read-only) falls back without moving anything and restores the previous step's params.
    cfg, model, _, step = load_for_inference(run_dir)
    assert step == 38 and latest.is_dir()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))
    # Resuming moves it aside with a warning naming it.
    with caplog.at_level("WARNING"):
        assert latest_intact(ckpt) == 38
    assert not latest.exists()
    assert [p.name.split("-")[0] for p in (run_dir / "corrupt_checkpoints").iterdir()] == ["40"]
    assert str(latest) in caplog.text


def test_a_checkpoint_without_its_completion_marker_is_never_restored(damaged_copy):
    run_dir, ckpt = damaged_copy
    # What a write killed before Orbax's commit leaves: the temporary directory, never renamed.
    (ckpt / "40").rename(ckpt / "42.orbax-checkpoint-tmp-1234567")
    assert intact_step(ckpt) == 38
    assert load_for_inference(run_dir)[3] == 38
    assert latest_intact(ckpt) == 38


def test_nonfinite_steps_are_skipped_bitwise_and_k_in_a_row_stop_the_run(setup, tmp_path):
    tmp, experiment, overrides, *_ = setup
    cfg = load_config(experiment, overrides + [f"run.dir={tmp_path / 'nan'}", "train.steps=10",
                                               "train.debug_nonfinite_steps=0,4,5,6", "train.max_nonfinite=3"])
    trainer = Trainer(cfg)
    try:
        with trainer.mesh_context():
            before = jax.device_get((trainer.state.params, trainer.state.opt_state))
            batch = trainer.to_global(next(trainer.train_iter))
            trainer.state, metrics = trainer.train_step(trainer.state, batch)
            after = jax.device_get((trainer.state.params, trainer.state.opt_state))
        assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
        assert int(trainer.state.step) == 1
        # Bitwise: compare the raw bytes, not float equality.
        for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        with pytest.raises(NonFiniteLossError, match=r"step 7: 3 non-finite steps in a row.*checkpoints/6"):
            trainer.run()
        # Loss-spike skipping: a finite loss above the limit is skipped the same way.
        with trainer.mesh_context():
            before = jax.device_get((trainer.state.params, trainer.state.opt_state))
            batch = trainer.to_global(next(trainer.train_iter))
            trainer.state, metrics = trainer.train_step(trainer.state, batch, jnp.float32(0.0))
            after = jax.device_get((trainer.state.params, trainer.state.opt_state))
        assert (float(metrics["skipped"]), float(metrics["nonfinite"])) == (1.0, 0.0)
        assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                   for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    finally:
        trainer.close()
    records = [json.loads(line) for line in (cfg.run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [5, 6]  # step 7 raised before logging
    assert [r["step"] for r in records if r.get("skipped") == 0.0] == [2, 3, 4]
    ckpt = cfg.run.path / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir()) == [4, 6]  # nothing after the stop
    assert verify_checkpoint(ckpt / "6") is None
    _, model, _, step = load_for_inference(cfg.run.path)
    assert step == 6 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model))


def test_spike_limit_follows_the_running_mean_and_survives_a_checkpoint():
    guard = NumericalGuard(max_nonfinite=2, spike_factor=3.0)
    ok = {"nonfinite": 0.0, "skipped": 0.0}
    for i in range(SPIKE_WARMUP_STEPS):
        assert guard.step_args()[0] == np.inf  # not judged before the warm-up
        guard.observe(i + 1, {"loss": 2.0, **ok}, "ckpt")
    assert float(guard.step_args()[0]) == pytest.approx(6.0)
    guard.observe(11, {"loss": 50.0, "nonfinite": 0.0, "skipped": 1.0}, "ckpt")  # a spike: mean unchanged
    restored = NumericalGuard(max_nonfinite=2, spike_factor=3.0)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert restored.step_args() == guard.step_args() and restored.spikes_total == 1
    restored.observe(12, {"loss": float("nan"), "nonfinite": 1.0, "skipped": 1.0}, "ckpt")
    with pytest.raises(NonFiniteLossError, match="2 non-finite steps in a row.*last good checkpoint is ckpt"):
        restored.observe(13, {"loss": float("nan"), "nonfinite": 1.0, "skipped": 1.0}, "ckpt")
    assert NumericalGuard(max_nonfinite=0, spike_factor=0.0).step_args() == ()


def test_preflight_rejects_an_unusable_checkpoint_directory(setup, tmp_path):
    tmp, experiment, overrides, *_ = setup
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("a file where the checkpoint directory should be")
    with pytest.raises(ConfigError, match="checkpoint directory .* is not writable"):
        Trainer(load_config(experiment, overrides + [f"run.dir={blocked}"]))
    with pytest.raises(ConfigError, match="MB free, less than checkpoint.min_free_mb=1000000000"):
        Trainer(load_config(experiment, overrides + [f"run.dir={tmp_path / 'full'}", "checkpoint.min_free_mb=1000000000"]))
