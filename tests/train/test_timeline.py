"""The whole command's timeline (train/timeline.py) and the persistent compilation cache
(train/compile_cache.py): `python -m train` writes timeline.json whose phases add up to its wall
time, and a second run of the same recipe in a fresh process loads every executable from the
cache (the C++ CPU kernels' FFI calls included) and ends with the same parameters, bit for bit."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from train import compile_cache
from train.timeline import Timeline, peak_rss_bytes, process_start_time, rss_bytes

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("interpreter", "imports", "setup", "data", "model init", "peak FLOP/s", "compile", "steps", "evals",
          "checkpoint saves", "final eval", "samples", "checkpoint wait", "summary", "close")


def test_phases_add_up_to_the_wall_time_and_nested_phases_are_charged_to_the_inner_one():
    tl = Timeline(start=time.time())
    with tl.phase("outer"):
        sum(range(10_000))
        with tl.phase("inner"):
            time.sleep(0.01)
        with tl.phase("inner"):  # entered twice: accumulates
            time.sleep(0.01)
    tl.finish(None, "close")
    assert set(tl.phases) == {"other", "outer", "inner", "close"}
    assert tl.phases["inner"] >= 0.02
    assert sum(tl.phases.values()) == pytest.approx(tl.wall_s, rel=1e-9)
    now = rss_bytes()
    record = tl.to_dict()
    assert record["peak_rss_bytes"] >= now > 0 and peak_rss_bytes() >= record["peak_rss_bytes"]


def test_process_start_is_before_this_interpreter_ran_any_code():
    import train.timeline as timeline_module

    start = process_start_time()
    assert start <= timeline_module._IMPORTED_AT  # the process existed before the module was imported
    assert time.time() - start < 24 * 3600


def test_compile_cache_setting():
    old = os.environ.get(compile_cache.ENV)
    try:
        os.environ[compile_cache.ENV] = "0"
        assert compile_cache.enable_compile_cache() == "off (JAXLM_COMPILE_CACHE=0)"
        os.environ[compile_cache.ENV] = "maybe"
        with pytest.raises(compile_cache.CompileCacheSettingError, match="use 1 .* or 0"):
            compile_cache.enable_compile_cache()
    finally:
        if old is None:
            os.environ.pop(compile_cache.ENV, None)
        else:
            os.environ[compile_cache.ENV] = old


def _corpus(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "self", "value", "(", ")", ":"]
    path = tmp / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(words, size=8)) + "\n" for _ in range(300)))
    return path


def _tiny_command(corpus: Path, run_dir: Path) -> list[str]:
    """A tiny run with all three C++ CPU kernels (head_dim 32), so their FFI calls go through the cache."""
    return [sys.executable, "-m", "train", str(ROOT / "experiments" / "shakespeare_char_cpu.yaml"), "model.preset=gpt2-nano", "model.n_layers=1",
            "model.d_model=64", "model.n_heads=2", "model.max_seq_len=32", "model.attention=cpu", "model.matmul=cpu",
            "model.norm_impl=cpu", "data.source=files", f"data.path={corpus}", "data.tokenizer=char",
            "data.seq_len=32", "train.batch_size=4", "train.steps=6", "train.log_every=2", "train.eval_every=3",
            "train.eval_batches=2", "train.sample_tokens=8", "train.sample_prompt=alpha", "train.progress=false",
            "optim.warmup_steps=2", "checkpoint.every=3", f"run.dir={run_dir}"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same tiny recipe twice, each in a fresh process, sharing an empty compilation cache."""
    tmp = tmp_path_factory.mktemp("timeline")
    cache = tmp / "cache"
    built = compile_cache.cache_dir().parent / "cpu_kernels"  # reuse this machine's kernel build
    if built.is_dir():
        shutil.copytree(built, cache / "cpu_kernels")
    env = {**os.environ, "JAXLM_CACHE_DIR": str(cache), "JAXLM_COMPILE_CACHE": "1"}
    env.pop("XLA_FLAGS", None)  # one device, as a user's command has (the kernels need one)
    corpus = _corpus(tmp)
    runs = []
    for i in range(2):
        run_dir = tmp / f"run{i}"
        cmd = _tiny_command(corpus, run_dir)
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        t1 = time.time()
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append({"dir": run_dir, "stdout": out.stdout, "t0": t0, "t1": t1,
                     "timeline": json.loads((run_dir / "timeline.json").read_text()),
                     "summary": json.loads((run_dir / "summary.json").read_text())})
    return runs


def test_timeline_json_covers_the_command_and_adds_up(two_runs):
    run = two_runs[0]
    tl = run["timeline"]
    assert set(PHASES) <= set(tl["phases_s"]), tl["phases_s"]
    assert sum(tl["phases_s"].values()) == pytest.approx(tl["wall_s"], rel=1e-6)
    # from the process's start (after we launched it) to shortly before it exited
    assert run["t0"] - 1.0 <= tl["process_start_unix"] <= run["t0"] + tl["phases_s"]["interpreter"] + 1.0
    assert tl["process_start_unix"] + tl["wall_s"] <= run["t1"] + 0.05
    assert tl["phases_s"]["imports"] > 0 and tl["phases_s"]["steps"] > 0
    assert tl["peak_rss_bytes"] >= run["summary"]["peak_rss_bytes"] > 50 * 2**20
    lines = [line for line in run["stdout"].splitlines() if line.startswith("timeline: ")]
    assert len(lines) == 1 and "peak RSS" in lines[0] and "compile" in lines[0]


def test_second_run_loads_every_executable_from_the_cache_and_ends_bit_identical(two_runs):
    first, second = (r["timeline"] for r in two_runs)
    # an empty cache: every program compiled (and written); the hits are programs compiled twice in
    # one process (a function jitted anew), which the second compile finds on disk
    assert first["cache_misses"] > 0 and first["cache_hits"] < first["cache_misses"]
    assert second["compiles"] == first["compiles"] > 0
    assert second["cache_hits"] == second["compiles"] and second["cache_misses"] == 0
    assert two_runs[1]["summary"]["params_sha256"] == two_runs[0]["summary"]["params_sha256"]
    assert two_runs[1]["summary"]["val_loss"] == two_runs[0]["summary"]["val_loss"]


def test_bad_compile_cache_setting_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "JAXLM_COMPILE_CACHE": "sometimes"}
    out = subprocess.run([sys.executable, "-m", "train", str(ROOT / "experiments" / "quickstart.yaml"),
                          f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: JAXLM_COMPILE_CACHE='sometimes': use 1 (cache compiled programs under "
        f"{compile_cache.cache_dir()}, the default) or 0 (compile every run afresh)"]
