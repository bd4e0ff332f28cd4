"""A scaling study of our own: L(N) = E + A * N^(-alpha) over the recipes in experiments/scaling/.

    python -m experiments scaling                                   # run what is missing, fit, plot
    python -m experiments scaling --out experiments/scaling/scaling.png

Each size is an ordinary recipe (`experiments/scaling/d64_l3.yaml`, ...): the same data, token
budget, optimizer and schedule, only d_model / n_layers / n_heads differ. The runs go through
`train.loop.train` in this process into `<dir>/<size>/` (default `runs/scaling/`); a size whose
`summary.json` exists is not run again, so an interrupted study resumes where it stopped (and a
killed size resumes from its run directory). Then the final validation losses (whole split) are
fitted with L(N) = E + A * N^(-alpha), N the non-embedding parameter count (Kaplan et al.'s
convention; the fit over all parameters is printed too), and the training curves and the fit are
drawn into a PNG. The fit and the table are also written to `<dir>/scaling.json`.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from experiments.expectations import EXPERIMENTS_DIR, recipe_paths

SCALING_PREFIX = "scaling/"


def study_recipes() -> dict[str, Path]:
    """The study's recipes by name (`scaling/d64_l3`), smallest model first."""
    from train.config import load_config

    recipes = {n: p for n, p in recipe_paths(EXPERIMENTS_DIR).items() if n.startswith(SCALING_PREFIX)}
    size = {n: load_config(p, ["model.vocab_size=257"]).model.num_params(include_embedding=False)
            for n, p in recipes.items()}
    return dict(sorted(recipes.items(), key=lambda kv: size[kv[0]]))


def run_missing(runs_dir: Path, overrides: list[str], log=print) -> float:
    """Train every size whose `<runs_dir>/<size>/summary.json` is missing; seconds spent training."""
    from experiments.reproduce import run_recipe

    spent = 0.0
    recipes = study_recipes()
    for i, (name, path) in enumerate(recipes.items()):
        run_dir = runs_dir / name.removeprefix(SCALING_PREFIX)
        if (run_dir / "summary.json").is_file():
            log(f"[{i + 1}/{len(recipes)}] {name}: done before ({run_dir / 'summary.json'}), skipped")
            continue
        log(f"[{i + 1}/{len(recipes)}] {name}: training into {run_dir}")
        _, summary, wall = run_recipe(path, overrides, default_run_dir=run_dir)
        (run_dir / "command_time.json").write_text(json.dumps({"wall_time_s": wall}) + "\n")
        spent += wall
        log(f"[{i + 1}/{len(recipes)}] {name}: val_loss {summary['val_loss']:.4f} in {wall:.0f} s")
    return spent


def collect(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per finished size: parameters, final val loss, time, tokens, and its training curve."""
    from train.config import load_config

    rows = []
    for name in study_recipes():
        run_dir = runs_dir / name.removeprefix(SCALING_PREFIX)
        if not (run_dir / "summary.json").is_file():
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = load_config(run_dir / "config.yaml")  # resolved: the vocabulary size is filled in
        timing = run_dir / "command_time.json"
        wall = json.loads(timing.read_text())["wall_time_s"] if timing.is_file() else summary["wall_time_s"]
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        curve = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows.append({
            "name": name,
            "d_model": cfg.model.d_model,
            "n_layers": cfg.model.n_layers,
            "n_params": cfg.model.num_params(include_embedding=False),
            "n_params_total": cfg.model.num_params(include_embedding=True),
            "tokens": cfg.train.steps * tokens_per_step,
            "val_loss": summary["val_loss"],
            "wall_time_s": wall,
            "tokens_per_s": summary.get("tokens_per_s"),
            "curve": [(r["step"] * tokens_per_step, r["loss"], r.get("val_loss"))
                      for r in curve if "loss" in r],
        })
    return rows


def fit_power_law(n: np.ndarray, loss: np.ndarray) -> dict[str, Any]:
    """Least-squares fit of loss = E + A * n^(-alpha) (E >= 0, A > 0, alpha > 0).

    For a fixed alpha the model is linear in (E, A), so a grid over alpha with a linear solve per
    point finds the global least-squares fit without a starting guess; scipy's curve_fit (when
    installed) then refines it and gives standard errors."""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if len(n) < 3:
        raise ValueError(f"a fit of E, A and alpha needs at least 3 sizes, got {len(n)}")
    best = None
    for alpha in np.geomspace(1e-3, 3.0, 3000):
        x = n ** -alpha
        design = np.stack([np.ones_like(x), x], axis=1)
        (e, a), *_ = np.linalg.lstsq(design, loss, rcond=None)
        if e < 0:  # the floor cannot be negative: fit A alone with E = 0
            e, a = 0.0, float(x @ loss / (x @ x))
        sse = float(np.sum((e + a * x - loss) ** 2))
        if a > 0 and (best is None or sse < best[0]):
            best = (sse, float(e), float(a), float(alpha))
    if best is None:
        raise ValueError("the losses do not fall with N: no power law with A > 0 fits")
    _, e, a, alpha = best
    result = {"E": e, "A": a, "alpha": alpha, "stderr": None, "method": "numpy grid over alpha + linear solve"}
    try:
        from scipy.optimize import curve_fit
    except ImportError:
        pass
    else:
        try:
            with warnings.catch_warnings():  # 3 sizes: no covariance estimate (the errors are reported as nan)
                warnings.simplefilter("ignore")
                p, cov = curve_fit(lambda n, e, a, al: e + a * n ** -al, n, loss, p0=(e, a, alpha),
                                   bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 5.0]), maxfev=20000)
            if np.sum((p[0] + p[1] * n ** -p[2] - loss) ** 2) <= best[0] + 1e-15:
                err = np.sqrt(np.diag(cov)) if len(n) > 3 else [math.nan] * 3
                result = {"E": float(p[0]), "A": float(p[1]), "alpha": float(p[2]),
                          "stderr": {"E": float(err[0]), "A": float(err[1]), "alpha": float(err[2])},
                          "method": "scipy.optimize.curve_fit (started from the grid fit)"}
        except (RuntimeError, ValueError):  # no convergence: keep the grid fit
            pass
    pred = result["E"] + result["A"] * n ** -result["alpha"]
    result["rmse"] = float(np.sqrt(np.mean((pred - loss) ** 2)))
    return result


def plot(rows: list[dict[str, Any]], fit: dict[str, Any], out: Path) -> None:
    """Left: training loss against tokens, one line per size; right: final val loss against N and the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.cm.viridis(np.linspace(0.0, 0.9, len(rows)))
    for row, color in zip(rows, colors):
        tokens, loss, val = (np.array([c[i] if c[i] is not None else np.nan for c in row["curve"]], float)
                             for i in range(3))
        smooth = np.convolve(loss, np.ones(5) / 5, mode="valid") if len(loss) >= 5 else loss
        ax1.plot(tokens[len(tokens) - len(smooth):], smooth, color=color,
                 label=f"{row['name'].removeprefix(SCALING_PREFIX)}  N={row['n_params']:,}")
        has_val = ~np.isnan(val)
        ax1.plot(tokens[has_val], val[has_val], "o", color=color, ms=3)
    ax1.set(xlabel="training tokens", ylabel="loss (nats/byte)", xscale="log",
            title="training loss (5-point mean); dots: 10-batch validation estimates")
    # from a tenth of the budget on: the first steps' losses (5.5 nats and more) would flatten the rest
    late = [loss for row in rows for tok, loss, _ in row["curve"] if tok >= row["tokens"] / 10]
    if late:
        ax1.set_ylim(min(late) - 0.05, max(late) + 0.05)
    ax1.legend(fontsize=8)
    n = np.array([r["n_params"] for r in rows], float)
    loss = np.array([r["val_loss"] for r in rows], float)
    grid = np.geomspace(n.min() / 2, n.max() * 2, 200)
    ax2.plot(n, loss, "o", color="black", label="final val loss (whole split)")
    ax2.plot(grid, fit["E"] + fit["A"] * grid ** -fit["alpha"], "-", color="tab:red",
             label=f"L = {fit['E']:.3f} + {fit['A']:.3g} N^-{fit['alpha']:.3f}")
    ax2.axhline(fit["E"], ls="--", color="tab:red", lw=0.8, label=f"E = {fit['E']:.3f}")
    ax2.set(xscale="log", xlabel="non-embedding parameters N", ylabel="val loss (nats/byte)",
            title=f"L(N) at {rows[0]['tokens']:,} tokens each")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| size | d_model x layers | N (non-embedding) | N (all) | tokens | val loss | time, s | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['d_model']} x {r['n_layers']} | {r['n_params']:,} | "
                     f"{r['n_params_total']:,} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['wall_time_s']:.0f} | "
                     f"{r['tokens_per_s'] or 0:,.0f} |")
    return "\n".join(lines)


def format_fit(fit: dict[str, Any], what: str) -> str:
    s = f"L(N) = E + A * N^(-alpha) over {what}: E = {fit['E']:.4f}, A = {fit['A']:.4g}, alpha = {fit['alpha']:.4f}"
    if fit.get("stderr"):
        e = fit["stderr"]
        s += f"  (standard errors: E {e['E']:.3g}, A {e['A']:.3g}, alpha {e['alpha']:.3g})"
    return s + f"; rmse {fit['rmse']:.4f}; {fit['method']}"


def study(runs_dir: Path, out: Path | None, overrides: list[str], run: bool = True) -> dict[str, Any]:
    """Run the missing sizes (unless `run` is False), fit, plot; the results as a dict (also scaling.json)."""
    t0 = time.perf_counter()
    spent = run_missing(runs_dir, overrides) if run else 0.0
    rows = collect(runs_dir)
    missing = [n for n in study_recipes() if n not in {r["name"] for r in rows}]
    if len(rows) < 3:
        from model.config import ConfigError

        raise ConfigError(f"{len(rows)} sizes have finished under {runs_dir}; the fit needs at least 3 "
                          f"(missing: {', '.join(missing)})")
    n = np.array([r["n_params"] for r in rows], float)
    loss = np.array([r["val_loss"] for r in rows], float)
    fit = fit_power_law(n, loss)
    fit_total = fit_power_law(np.array([r["n_params_total"] for r in rows], float), loss)
    out = out or runs_dir / "scaling.png"
    plot(rows, fit, out)
    result = {
        "fit": fit, "fit_total_params": fit_total,
        "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        "missing": missing, "png": str(out),
        "train_time_this_command_s": spent, "time_all_sizes_s": sum(r["wall_time_s"] for r in rows),
        "command_time_s": time.perf_counter() - t0, "overrides": overrides,
    }
    (runs_dir / "scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(rows))
    print(format_fit(fit, "non-embedding parameters"))
    print(format_fit(fit_total, "all parameters (embeddings included)"))
    if missing:
        print(f"not finished: {', '.join(missing)}")
    print(f"figure: {out}; fit and table: {runs_dir / 'scaling.json'}; time of all sizes "
          f"{result['time_all_sizes_s']:.0f} s (this command {result['command_time_s']:.0f} s)", flush=True)
    return result
