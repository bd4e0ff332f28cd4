"""Chaos run: SIGKILL a training run at random moments, restart it each time, and check that it
ends bit-identical to a run that was never interrupted.

    python -m train.chaos experiments/chaos.yaml --kills 20 --seed 0 --workdir runs/chaos

It trains the experiment once without interruption (the reference), then again in a fresh run
directory, killing the process (SIGKILL: no handler runs, nothing is flushed) `--kills` times at
seeded random moments of three kinds, and finally lets it finish:
  startup  a random delay after the process starts (imports, data, restore, compilation);
  step     a random delay after a random training step was logged;
  write    the moment a new `*.orbax-checkpoint-tmp*` directory appears: an asynchronous
           checkpoint write is in flight (the record says whether it still was at the kill).
It prints one row per kill and whether the final `params_sha256` values match; exit status 0 only
when they do. Every process gets a shared persistent compilation cache, so restarts do not
recompile (`--no-compile-cache` to measure without it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP_MARK = "orbax-checkpoint-tmp"
POLL_S = 0.002
MODES = ("startup", "step", "write")


def compile_cache_env(cache_dir: Path) -> dict:
    """Environment that makes JAX cache every compiled executable on disk (no size/time floor)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _command(experiment: str, overrides: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "train", experiment, *overrides, f"run.dir={run_dir}", "train.progress=false"]


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line cut short by a kill
    return steps


def _tmp_dirs(ckpt_dir: Path) -> set[str]:
    return {p.name for p in ckpt_dir.iterdir() if TMP_MARK in p.name} if ckpt_dir.is_dir() else set()


def _summary_sha(run_dir: Path) -> str | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text())["params_sha256"] if path.is_file() else None


def run_chaos(experiment: str, overrides: list[str], workdir: Path, kills: int, seed: int = 0,
              env: dict | None = None, compile_cache: bool = True, reference: Path | None = None,
              log=print) -> dict:
    """Reference run (or the finished run directory `reference`), then a run killed `kills` times;
    returns both hashes and one record per kill. Startup kills land before the first step, timed
    from the start-up duration the previous processes showed."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if compile_cache:
        env.update(compile_cache_env(workdir / "jax_cache"))
    steps = _config_steps(experiment, overrides)

    t0 = time.perf_counter()
    ref_dir = workdir / "reference" if reference is None else Path(reference)
    if reference is None:
        r = subprocess.run(_command(experiment, overrides, ref_dir), env=env, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"reference run failed:\n{r.stderr[-3000:]}")
    reference_s = time.perf_counter() - t0
    log(f"reference run: {reference_s:.1f} s, params_sha256 {_summary_sha(ref_dir)}")

    rng = random.Random(seed)
    run_dir = workdir / "chaos"
    ckpt_dir = run_dir / "checkpoints"
    records, t_chaos = [], time.perf_counter()
    startup_s = None  # seconds from spawn to the first logged step, as last observed
    while len(records) < kills:
        # Startup kills need a measured start-up time; the first process also builds the token store.
        mode = rng.choice(MODES[1:] if startup_s is None else MODES)
        before_steps = len(_logged_steps(run_dir))
        before_tmp = _tmp_dirs(ckpt_dir)
        done_steps = max(_logged_steps(run_dir) or [0])
        target = min(steps - 2, done_steps + rng.randint(1, 4))
        delay = rng.uniform(0.0, startup_s if mode == "startup" else 0.02)
        spawned = time.perf_counter()
        proc = subprocess.Popen(_command(experiment, overrides, run_dir), env=env, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        fired_at = None
        while proc.poll() is None:
            now = time.perf_counter()
            if mode != "startup" and len(_logged_steps(run_dir)) > before_steps and (
                    startup_s is None or now - spawned < startup_s):
                startup_s = now - spawned
            if mode == "startup" and now - spawned >= delay:
                break
            if mode == "step":
                if fired_at is None and any(s >= target for s in _logged_steps(run_dir)[before_steps:]):
                    fired_at = now
                if fired_at is not None and now - fired_at >= delay:
                    break
            if mode == "write" and _tmp_dirs(ckpt_dir) - before_tmp:
                break
            time.sleep(POLL_S)
        if proc.poll() is not None:  # it finished (or failed) before the moment came
            err = proc.stderr.read()
            if proc.returncode != 0:
                raise RuntimeError(f"chaos run failed on its own (exit {proc.returncode}):\n{err[-3000:]}")
            log("the run finished before the next kill point; starting over from scratch would change "
                "nothing: use more train.steps for more kills")
            break
        tmp_at_kill = sorted(_tmp_dirs(ckpt_dir) - before_tmp)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        logged = _logged_steps(run_dir)[before_steps:]
        rec = {"kill": len(records) + 1, "mode": mode, "after_s": round(time.perf_counter() - spawned, 2),
               "last_logged_step": max(logged) if logged else None,
               "during_write": bool(tmp_at_kill), "tmp_dirs": tmp_at_kill}
        records.append(rec)
        log(f"kill {rec['kill']:2d}  {mode:7s}  {rec['after_s']:6.2f} s after start  last step logged "
            f"{rec['last_logged_step']}  {'during async write ' + ','.join(tmp_at_kill) if tmp_at_kill else ''}")

    r = subprocess.run(_command(experiment, overrides, run_dir), env=env, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"final chaos process failed:\n{r.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "reference_sha256": _summary_sha(ref_dir), "chaos_sha256": summary["params_sha256"],
        "kills": records, "during_write": sum(r["during_write"] for r in records),
        "final_resumed_from_step": summary["resumed_from_step"], "steps": steps,
        "reference_s": reference_s, "chaos_s": time.perf_counter() - t_chaos,
        "corrupt_moved_aside": sorted(p.name for p in (run_dir / "corrupt_checkpoints").glob("*")),
    }
    result["match"] = result["reference_sha256"] == result["chaos_sha256"]
    return result


def _config_steps(experiment: str, overrides: list[str]) -> int:
    from train.config import load_config

    return load_config(experiment, overrides).train.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.chaos", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("experiment", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/chaos", help="emptied first")
    parser.add_argument("--no-compile-cache", action="store_true")
    args = parser.parse_args(argv)

    import shutil

    from train.config import ConfigError

    try:
        _config_steps(args.experiment, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    result = run_chaos(args.experiment, args.overrides, workdir, args.kills, args.seed,
                       compile_cache=not args.no_compile_cache)
    (workdir / "chaos.json").write_text(json.dumps(result, indent=1))
    print(f"\n{len(result['kills'])} kills ({result['during_write']} during an async checkpoint write), "
          f"{len(result['corrupt_moved_aside'])} torn checkpoints moved aside; reference {result['reference_s']:.0f} s, "
          f"chaos {result['chaos_s']:.0f} s")
    print(f"reference params_sha256 {result['reference_sha256']}\nchaos     params_sha256 {result['chaos_sha256']}")
    print("MATCH" if result["match"] else "MISMATCH")
    return 0 if result["match"] else 1


if __name__ == "__main__":
    sys.exit(main())
