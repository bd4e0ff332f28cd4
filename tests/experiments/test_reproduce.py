"""`python -m experiments reproduce/check` on a real tiny run: FAIL outside the tolerance, PASS inside,
UNVERIFIED against a never-measured reference; the table is written next to the run."""

import json
from pathlib import Path

import pytest

from experiments.__main__ import main

ROOT = Path(__file__).resolve().parents[2]
TINY = """model:
  preset: llama-tiny
  d_model: 32
  n_layers: 1
  n_heads: 2
  n_kv_heads: 1
  d_ff: 64
  max_seq_len: 32
data:
  source: python_stdlib
  max_chars: 40000
  tokenizer: byte
  seq_len: 32
train:
  steps: 4
  batch_size: 4
  eval_every: 0
  log_every: 2
  sample_tokens: 0
  progress: false
checkpoint:
  every: 0
mesh:
  num_devices: 1
run:
  name: tiny
"""


def recipe(path: Path, value, tolerance=0.01, status="measured") -> Path:
    path.write_text(f"""# a tiny recipe for the checker's tests
# expect:
#   metric: val_loss
#   value: {value}
#   tolerance: {tolerance}
#   hardware: cpu-2core
#   time_s: 30
#   measured: tests/experiments
#   status: {status}
""" + TINY)
    return path


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory):
    """One real tiny run through `reproduce`, against an expectation it cannot meet (val_loss 0.5)."""
    tmp = tmp_path_factory.mktemp("reproduce")
    run_dir = tmp / "run"
    code = main(["reproduce", str(recipe(tmp / "tiny.yaml", 0.5)), f"run.dir={run_dir}", "train.steps=5"])
    return code, run_dir


def test_reproduce_fails_a_run_outside_the_tolerance(failed_run, capsys):
    code, run_dir = failed_run
    assert code == 1
    rep = json.loads((run_dir / "reproduce.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rep["verdict"] == "FAIL" and rep["check"]["measured"] == summary["val_loss"]
    assert rep["check"]["expected"] == 0.5 and summary["step"] == 5  # the override passed through
    assert rep["overrides"] == [f"run.dir={run_dir}", "train.steps=5"]
    md = (run_dir / "reproduce.md").read_text()
    assert "**FAIL**" in md and f"{summary['val_loss']:.6f}" in md and "| 0.500000 |" in md


def test_check_passes_the_same_run_inside_the_tolerance(failed_run, tmp_path, capsys):
    _, run_dir = failed_run
    measured = json.loads((run_dir / "summary.json").read_text())["val_loss"]
    assert main(["check", str(recipe(tmp_path / "ok.yaml", round(measured, 6), 0.001)), str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "**PASS**" in out and json.loads((run_dir / "check.json").read_text())["verdict"] == "PASS"
    assert json.loads((run_dir / "reproduce.json").read_text())["verdict"] == "FAIL"  # reproduce's own is kept
    # just outside: measured + 0.0011 with a tolerance of 0.001
    assert main(["check", str(recipe(tmp_path / "off.yaml", round(measured + 0.0011, 6), 0.001)),
                 str(run_dir)]) == 1
    assert "**FAIL**" in capsys.readouterr().out


def test_a_never_measured_expectation_is_unverified_not_pass(failed_run, tmp_path, capsys):
    _, run_dir = failed_run
    measured = json.loads((run_dir / "summary.json").read_text())["val_loss"]
    assert main(["check", str(recipe(tmp_path / "ref.yaml", round(measured, 6), status="not-measured")),
                 str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "**UNVERIFIED**" in out and "PASS" not in out and "never measured with jaxlm" in out


def test_check_of_a_run_without_summary_is_one_line(tmp_path, capsys):
    assert main(["check", str(recipe(tmp_path / "r.yaml", 1.0)), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "summary.json does not exist" in err


def test_bad_override_is_one_line_before_training(tmp_path, capsys):
    assert main(["reproduce", str(recipe(tmp_path / "r.yaml", 1.0)), "train.stepz=3",
                 f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stepz" in err and not (tmp_path / "run" / "summary.json").exists()
