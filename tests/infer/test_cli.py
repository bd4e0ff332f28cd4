"""`python -m infer sample` end to end on a real (tiny, untrained) checkpoint, and its user errors:
one line on stderr, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optax
import pytest

from model import build_model, preset
from train.checkpoint import Checkpointer
from train.config import DataConfig, ExperimentConfig
from model.tokenizer import ByteTokenizer, CharTokenizer
from train.step import init_train_state

ROOT = Path(__file__).resolve().parents[2]


def write_checkpoint(run_dir: Path, tokenizer, step: int = 3) -> None:
    cfg = preset("gpt2-nano", vocab_size=tokenizer.vocab_size, n_layers=2)
    model = build_model(cfg, seed=0)
    _, state = init_train_state(model, optax.adam(1e-3), seed=0)
    config = ExperimentConfig(model=cfg, data=DataConfig(seq_len=cfg.max_seq_len)).validate().to_dict()
    ckpt = Checkpointer(run_dir / "checkpoints", async_save=False)
    ckpt.save(step, state, data_state={}, config=config, tokenizer_json=tokenizer.to_json())
    ckpt.close()


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("byte_run")
    write_checkpoint(run, ByteTokenizer())
    return run


def infer(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "infer", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_user_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_sample_prints_prompt_and_completion(byte_run):
    r = infer("sample", "--run", str(byte_run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ")
    assert len(r.stdout) > len("def \n")
    # Same checkpoint, same settings: the same text (greedy), also when the step is named.
    again = infer("sample", "--run", str(byte_run / "checkpoints"), "--prompt", "def ", "--max-new-tokens", "8",
                  "--temperature", "0", "--step", "3")
    assert again.returncode == 0, again.stderr
    assert again.stdout == r.stdout


def test_sample_longer_than_the_context(byte_run):
    """The tiny model has 64 positions; 100 new tokens slide the window instead of failing."""
    r = infer("sample", "--run", str(byte_run), "--prompt", "x", "--max-new-tokens", "100", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("x")


def test_missing_run_dir_is_a_one_line_error(tmp_path):
    assert_user_error(infer("sample", "--run", str(tmp_path / "nope"), "--prompt", "x"), "nope")


def test_user_errors_are_one_line(byte_run, tmp_path):
    run = str(byte_run)
    assert_user_error(infer("sample", "--run", str(tmp_path), "--prompt", "x"), "no complete checkpoint")
    assert_user_error(infer("sample", "--run", run, "--prompt", "x", "--step", "99"), "step 99")
    assert_user_error(infer("sample", "--run", run, "--prompt", "x", "--temperature", "-1"), "--temperature")
    assert_user_error(infer("sample", "--run", run, "--prompt", "x", "--top-p", "0"), "--top-p")
    assert_user_error(infer("sample", "--run", run, "--prompt", "x", "--top-k", "abc"), "--top-k")
    assert_user_error(infer("sample", "--run", run, "--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens")
    assert_user_error(infer("sample", "--prompt", "x"), "--run")
    assert_user_error(infer("bogus"), "bogus")


def test_char_tokenizer_unknown_character_and_empty_prompt(tmp_path):
    write_checkpoint(tmp_path, CharTokenizer.train(["abc def"]))
    assert_user_error(infer("sample", "--run", str(tmp_path), "--prompt", "abz"), "'z'")
    assert_user_error(infer("sample", "--run", str(tmp_path), "--prompt", ""), "EOS")


def test_sample_stream_int8_stop_and_export(byte_run, tmp_path):
    """--stream prints the same text as a plain greedy run (cut at the --stop string); `export`
    writes an artifact that `python -m infer.load_exported` runs."""
    args = ("sample", "--run", str(byte_run), "--prompt", "ab", "--max-new-tokens", "12", "--temperature", "0",
            "--quantize", "int8")
    plain = infer(*args)
    assert plain.returncode == 0, plain.stderr
    text = plain.stdout[2:-1]
    stop = text[4:6] if len(text) >= 6 else None
    streamed = infer(*args, "--stream", *(("--stop", stop) if stop else ()))
    assert streamed.returncode == 0, streamed.stderr
    expected = "ab" + (text[:text.index(stop)] if stop else text)
    assert streamed.stdout.startswith(expected)  # the stream also shows the stop string itself
    out = tmp_path / "m.jaxlm"
    r = infer("export", "--run", str(byte_run), "--out", str(out))
    assert r.returncode == 0, r.stderr and out.is_file()
    assert_user_error(infer("export", "--run", str(byte_run), "--out", str(out), "--batch", "0"), "--batch")
