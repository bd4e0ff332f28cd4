"""The scaling study: same budget for every size, a power-law fit that recovers known parameters,
resumption that skips finished sizes, and the figure."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import scaling
from train.config import load_config


def test_five_or_more_sizes_differ_only_in_the_model():
    recipes = scaling.study_recipes()
    assert len(recipes) >= 5
    cfgs = [load_config(p, ["model.vocab_size=257"]) for p in recipes.values()]
    sizes = [c.model.num_params(include_embedding=False) for c in cfgs]
    assert sizes == sorted(sizes) and sizes[0] < 30_000 and sizes[-1] > 1_000_000  # ~20 k to ~2 M
    first = cfgs[0].to_dict()
    for c in cfgs[1:]:
        d = c.to_dict()
        for section in ("data", "optim", "train", "checkpoint", "mesh"):
            assert d[section] == first[section], section  # same corpus, token budget, schedule
        diff = {k for k in d["model"] if d["model"][k] != first["model"][k]}
        assert diff <= {"d_model", "n_layers", "n_heads"}, diff
    assert first["data"]["source"] == "python_stdlib"  # embedded corpus: no download


@pytest.mark.parametrize("use_scipy", [True, False])
def test_fit_recovers_a_known_power_law(use_scipy, monkeypatch):
    if not use_scipy:  # the numpy fallback alone
        import builtins

        real_import = builtins.__import__

        def no_scipy(name, *a, **k):
            if name.startswith("scipy"):
                raise ImportError(name)
            return real_import(name, *a, **k)

        monkeypatch.setattr(builtins, "__import__", no_scipy)
    n = np.array([2e4, 6e4, 1.5e5, 4.5e5, 1.2e6, 1.9e6])
    loss = 1.2 + 30.0 * n ** -0.35
    fit = scaling.fit_power_law(n, loss)
    assert fit["alpha"] == pytest.approx(0.35, rel=0.01 if use_scipy else 0.02)
    assert fit["E"] == pytest.approx(1.2, abs=0.02) and fit["rmse"] < 1e-3
    assert ("scipy" in fit["method"]) == use_scipy


def test_fit_rejects_losses_that_do_not_fall():
    with pytest.raises(ValueError, match="do not fall"):
        scaling.fit_power_law(np.array([1e4, 1e5, 1e6]), np.array([1.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match="at least 3"):
        scaling.fit_power_law(np.array([1e4, 1e5]), np.array([2.0, 1.5]))


def test_finished_sizes_are_skipped(tmp_path):
    """A size whose summary.json exists is not trained again (an interrupted study resumes)."""
    for name in scaling.study_recipes():
        d = tmp_path / name.removeprefix("scaling/")
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"val_loss": 2.0}))
    lines = []
    assert scaling.run_missing(tmp_path, [], log=lines.append) == 0.0
    assert len(lines) == len(scaling.study_recipes()) and all("skipped" in line for line in lines)


def test_plot_writes_the_figure(tmp_path):
    n = [12_768, 56_640, 150_080]
    rows = [{"name": f"scaling/s{i}", "n_params": k, "tokens": 10_240, "val_loss": 2.5 - 0.2 * i,
             "curve": [(1024 * s, 3.0 - 0.01 * s - 0.2 * i, None if s % 5 else 2.9 - 0.2 * i) for s in range(1, 11)]}
            for i, k in enumerate(n)]
    fit = scaling.fit_power_law(np.array(n, float), np.array([r["val_loss"] for r in rows]))
    scaling.plot(rows, fit, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
