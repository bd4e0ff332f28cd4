"""experiments/notebooks/quickstart.ipynb runs top to bottom at tiny settings on the CPU."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "experiments" / "notebooks" / "quickstart.ipynb"
TINY = """# tiny settings (tests/experiments/test_notebook.py)
STEPS = 4
EXTRA_STEPS = 2
RUN_DIR = {run_dir!r}
OVERRIDES = ["data.tokenizer=byte", "data.max_chars=40000", "data.seq_len=32", "model.max_seq_len=32",
             "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=64",
             "train.batch_size=4", "train.eval_every=2", "train.eval_batches=2", "train.log_every=1",
             "train.sample_tokens=0", "optim.warmup_steps=1"]
SAMPLE_TOKENS = 8
"""


def test_notebook_runs_every_cell_at_tiny_settings_on_cpu(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(TINY.format(run_dir=str(tmp_path / "run"))))
    # the kernel inherits this environment: no install, the CPU, one device (not the suite's eight)
    monkeypatch.setenv("JAXLM_NOTEBOOK_SKIP_INSTALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell when any cell fails
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "on cpu" in text and "val loss" in text
    assert "checkpoint step 6" in text  # loaded the checkpoint `python -m train` wrote
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))  # the loss curve
    assert (tmp_path / "run" / "checkpoints" / "6").is_dir() and (tmp_path / "run" / "summary.json").is_file()
