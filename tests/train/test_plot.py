"""`python -m train.plot` draws a run's curves into a PNG."""

import json
import subprocess
import sys
from pathlib import Path

from train.plot import main

ROOT = Path(__file__).resolve().parents[2]


def test_plot_writes_a_png(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 4.0 - s / 10, "tokens_per_s": 1000.0 + s} for s in range(1, 11)]
    records += [{"step": 10, "loss": 3.0, "val_loss": 3.1}, {"step": 10, "val_loss": 3.05, "final": True}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert main([str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_of_a_non_run_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "train.plot", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr
