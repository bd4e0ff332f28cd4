"""Run a recipe and compare its result with the recipe's `# expect:` block.

    python -m experiments reproduce shakespeare_char_cpu data.path=/path/to/tinyshakespeare.txt
    python -m experiments check shakespeare_char_cpu runs/shakespeare_char_cpu     # an existing run

The run goes through `train.loop.train` in this process (what `python -m train` calls), into a
fresh run directory `runs/reproduce/<name>-<UTC time>` unless an override sets `run.dir`. The
pass/fail table (expected vs measured, from the run's summary.json) is printed and written next
to the run as `reproduce.json` and `reproduce.md` (`check`: `check.json` and `check.md`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from experiments.expectations import Check, Expectation, check, find_recipe, read_expectation


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        s = str(v)
        return s if len(s) <= 20 else s[:16] + "…"
    return f"{v:.6f}" if abs(v) < 1e4 else f"{v:,.0f}"


def hardware_here() -> str:
    """What this process runs on, in the words the table prints next to the expectation's hardware."""
    import jax

    backend = jax.default_backend()
    kind = jax.devices()[0].device_kind if backend != "cpu" else platform.machine()
    return f"{backend} ({kind}), {os.cpu_count()} CPU cores"


def report(name: str, expectation: Expectation, summary: dict[str, Any], run_dir: Path | str,
           wall_time_s: float | None = None, hardware: str | None = None) -> dict[str, Any]:
    """The check of one run as a JSON-able dict: verdict, the rows of the table, where it ran."""
    c = check(expectation, summary)
    wall = wall_time_s if wall_time_s is not None else summary.get("wall_time_s")
    return {
        "recipe": name,
        "run_dir": str(run_dir),
        "verdict": c.verdict,
        "check": {**asdict(c), "difference": c.difference},
        "expectation": asdict(expectation),
        "time_s": {"expected": expectation.time_s, "measured": wall},
        "hardware": {"expected": expectation.hardware, "measured": hardware},
        "summary": summary,
    }


def table(rep: dict[str, Any]) -> str:
    """The pass/fail table as markdown (printed to the terminal and written to reproduce.md)."""
    c, t, hw = rep["check"], rep["time_s"], rep["hardware"]
    tol = "exact" if isinstance(c["expected"], str) else f"± {c['tolerance']:g}"
    diff = "-" if c["difference"] is None else f"{c['difference']:+.6f}"
    ratio = "-" if not t["measured"] else f"{t['measured'] / t['expected']:.2f}x"
    took = "-" if t["measured"] is None else f"{t['measured']:.0f}"
    rows = [
        "| recipe | check | expected | tolerance | measured | difference | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {rep['recipe']} | {c['metric']} | {_fmt(c['expected'])} | {tol} | {_fmt(c['measured'])} | {diff} | "
        f"**{c['verdict']}** |",
        f"| {rep['recipe']} | wall time, s (informative) | {t['expected']:.0f} | - | {took} | "
        f"{ratio} | info |",
    ]
    notes = [f"hardware: expected {hw['expected']}; this run: {hw['measured'] or 'unknown'}",
             f"run: {rep['run_dir']}"]
    if c["verdict"] == "UNVERIFIED":
        notes.append("UNVERIFIED: the recipe's expectation is a reference never measured with jaxlm "
                     f"({rep['expectation']['measured']}); record this run's {c['metric']} in the recipe's "
                     "'# expect:' block (status: measured) once it is trusted")
    elif c["verdict"] == "MISSING":
        notes.append(f"MISSING: the run's summary.json has no {c['metric']!r}")
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def write_report(rep: dict[str, Any], run_dir: Path, stem: str = "reproduce") -> None:
    """`<stem>.json` and `<stem>.md` in the run directory (`check` writes check.*, keeping reproduce.*)."""
    run_dir = Path(run_dir)
    (run_dir / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
    (run_dir / f"{stem}.md").write_text(f"# {stem} {rep['recipe']}: {rep['check']['verdict']}\n\n" + table(rep))


def exit_code(verdict: str) -> int:
    """0 for PASS and UNVERIFIED (nothing to compare against yet), 1 for FAIL and MISSING."""
    return 0 if verdict in ("PASS", "UNVERIFIED") else 1


def read_summary(run_dir: Path) -> dict[str, Any]:
    from model.config import ConfigError

    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the run has not finished (train it first)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON") from None


def run_recipe(path: Path, overrides: list[str], default_run_dir: Path | None = None) -> tuple[Path, dict, float]:
    """Train the recipe at `path` with `overrides` in this process; (run dir, summary, wall seconds).

    `default_run_dir` is used unless an override names run.dir. ConfigError on a user mistake."""
    from train.config import load_config
    from train.loop import train

    overrides = list(overrides)
    if default_run_dir is not None and not any(o.startswith("run.dir=") for o in overrides):
        overrides.append(f"run.dir={default_run_dir}")
    cfg = load_config(path, overrides)
    t0 = time.perf_counter()
    summary = train(cfg)
    wall = time.perf_counter() - t0
    if summary.get("preempted"):
        from model.config import ConfigError

        raise ConfigError(f"the run was stopped by {summary['signal']} at step {summary['step']}; rerun with "
                          f"run.dir={cfg.run.path} to finish it")
    return cfg.run.path, summary, wall


def reproduce(name: str, overrides: list[str], runs_root: Path = Path("runs/reproduce")) -> dict[str, Any]:
    """Run recipe `name` with `overrides` and check it; prints the table and writes reproduce.json/.md."""
    path = find_recipe(name)
    expectation = read_expectation(path)  # before training: a bad header fails in a second, not an hour
    print(f"reproduce {name}: expect {expectation.describe()} on {expectation.hardware} in about "
          f"{expectation.time_s:.0f} s", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    label = name.replace("/", "_") if path.suffix == ".yaml" and not Path(name).suffix else path.stem
    run_dir, summary, wall = run_recipe(path, overrides, runs_root / f"{label}-{stamp}")
    # after training: a multi-host run initializes jax.distributed before any other JAX call
    rep = report(name, expectation, summary, run_dir, wall_time_s=wall, hardware=hardware_here())
    rep["overrides"] = list(overrides)
    write_report(rep, run_dir)
    print(table(rep), end="", flush=True)
    print(f"{rep['check']['verdict']}  (table written to {run_dir / 'reproduce.md'} and reproduce.json)", flush=True)
    return rep


def manifest_hardware(run_dir: Path) -> str | None:
    """Where an existing run ran, from its manifest.json (None when there is none)."""
    try:
        m = json.loads((Path(run_dir) / "manifest.json").read_text())
        d = m["devices"]
        return f"{d['platform']} ({d['kind']}) x{d['count']}, {m.get('platform', '')}".rstrip(", ")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_run(name: str, run_dir: Path) -> dict[str, Any]:
    """Check an existing run directory's summary.json against recipe `name` (no training); the table
    goes to check.json / check.md there."""
    expectation = read_expectation(find_recipe(name))
    summary = read_summary(run_dir)
    rep = report(name, expectation, summary, run_dir, hardware=manifest_hardware(run_dir))
    write_report(rep, run_dir, stem="check")
    print(table(rep), end="", flush=True)
    print(rep["check"]["verdict"], flush=True)
    return rep
