"""Plot training curves from run directories' metrics.jsonl.

    python -m train.plot runs/shakespeare_char_cpu [runs/other ...] --out curves.png

One panel of loss (training loss per logged step, validation estimates as markers, the final
whole-split validation loss as a star) and one of throughput (tokens/s), one colour per run.
Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(run_dirs):
        color = f"C{i}"
        records = read_metrics(run)
        train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and not r.get("final")]
        final = [(r["step"], r["val_loss"]) for r in records if r.get("final")]
        tps = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
        name = Path(run).name
        if train:
            ax_loss.plot(*zip(*train), color=color, alpha=0.6, lw=1, label=f"{name} train")
        if val:
            ax_loss.plot(*zip(*val), "o-", color=color, ms=4, label=f"{name} val (estimate)")
        if final:
            s, v = final[-1]
            ax_loss.plot([s], [v], "*", color=color, ms=14, label=f"{name} val, whole split: {v:.4f}")
        if tps:
            ax_tps.plot(*zip(*tps), color=color, lw=1, label=name)
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_tps.grid(alpha=0.3)
    ax_tps.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <first run>/curves.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('error: plotting needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        return 2
    try:
        out = plot_runs(args.runs, args.out or args.runs[0] / "curves.png")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
