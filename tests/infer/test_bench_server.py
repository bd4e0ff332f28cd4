"""`python -m infer.bench_server` end to end: two real servers (slots 2 and 1) on loopback ports,
streamed requests at a Poisson rate and all at once, the table and the JSON. No timed assertions:
the figures depend on the machine; what must hold is that every scenario ran on both servers,
completed every request and generated tokens."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest

from infer import bench_server
from infer.bench_server import BenchRequest, RequestResult, arrival_offsets, make_workload, summarize
from tests.infer.server_helpers import save_tiny_run

MODEL = dict(vocab_size=257, n_layers=1, d_model=32, n_heads=2, max_seq_len=32)


@pytest.fixture(scope="module")
def tiny_run() -> Path:
    """A random 1-layer byte-level model with a 32-token context, saved as a run directory."""
    return save_tiny_run(Path(tempfile.mkdtemp(prefix="jaxlm-bench-server-")) / "tiny", MODEL)


def test_workload_is_seeded_and_fits_the_context():
    ids = np.arange(1000)
    a = make_workload(ids, 20, 3, (10, 30), (20, 50), context=60)
    assert a == make_workload(ids, 20, 3, (10, 30), (20, 50), context=60)
    assert a != make_workload(ids, 20, 4, (10, 30), (20, 50), context=60)
    for r in a:
        assert 10 <= len(r.prompt_ids) <= 30 and 1 <= r.max_tokens <= 50
        assert len(r.prompt_ids) + r.max_tokens <= 60
        assert r.prompt_ids == list(range(r.prompt_ids[0], r.prompt_ids[0] + len(r.prompt_ids)))  # a slice
    assert (arrival_offsets(5, math.inf, 0) == 0).all()
    t = arrival_offsets(2000, 4.0, 0)
    assert t[0] == 0 and (np.diff(t) >= 0).all() and 3.5 < 1999 / t[-1] < 4.5  # about 4 requests/s


def test_summarize_counts_only_completed_requests():
    done = RequestResult(sent=0.0, ok=True, ttft=0.1, e2e=1.1, itl=[0.2, 0.3], completion_tokens=11, finished=1.1)
    lost = RequestResult(sent=0.0, error="not done within the time limit (1 s)")
    s = summarize([done, lost], wall=2.0)
    assert (s["requests"], s["completed"], s["output_tokens"]) == (2, 1, 11)
    assert s["output_tok_s"] == pytest.approx(5.5) and s["tpot_p50"] == pytest.approx(0.1)
    assert s["itl_p50"] == pytest.approx(0.25) and s["errors"] == [lost.error]


def test_bench_runs_every_scenario_on_both_servers(tiny_run, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench_server.main(["--run", str(tiny_run), "--slots", "2", "--rates", "20,max", "--requests", "3",
                            "--prompt-tokens", "4:12", "--output-tokens", "8:16", "--out", str(out),
                            "--response-format", "json_schema"])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m infer.bench_server --run ")
    assert {(r["scenario"], r["slots"], r["format"]) for r in data["rows"]} == {
        (s, n, f) for s in ("20 req/s", "max") for n in (2, 1) for f in ("text", "json_schema")}
    for r in data["rows"]:
        assert r["completed"] == r["requests"] == 3, r["errors"]
        assert r["output_tokens"] > 0 and r["output_tok_s"] > 0 and r["ttft_p50"] > 0 and r["e2e_p99"] > 0
    # the same scenarios with the schema: TPOT with / without for each scenario and server
    assert {(o["scenario"], o["slots"]) for o in data["format_overhead"]} == {
        (s, n) for s in ("20 req/s", "max") for n in (2, 1)}
    assert all(o["ratio"] > 0 for o in data["format_overhead"]) and "structured output (json_schema)" in printed
    # greedy: both servers generate the same tokens for the same requests
    tokens = {(r["scenario"], r["slots"]): r["output_tokens"] for r in data["rows"] if r["format"] == "text"}
    assert tokens[("max", 2)] == tokens[("max", 1)] == tokens[("20 req/s", 2)]
    assert set(data["ratios"]) == {"20 req/s", "max"} and all(v > 0 for v in data["ratios"].values())
    assert data["server_exit_codes"] == {"2": 0, "1": 0}  # SIGTERM drained both
    assert data["versions"]["jax"] and "CPUs usable" in data["machine_before"]
    for scenario in ("20 req/s", "max"):
        assert sum(line.startswith(f"| {scenario} |") for line in printed.splitlines()) == 4 + 2  # rows + overhead
    assert "output tok/s" in printed and "jaxlib" in printed


def test_user_mistakes_are_one_line(tiny_run, capsys):
    for argv, needle in ((["--run", "/nonexistent"], "no such run"),
                         (["--run", str(tiny_run), "--rates", "1,fast"], "'fast' is not a rate"),
                         (["--run", str(tiny_run), "--slots", "1"], "--slots=1"),
                         (["--run", str(tiny_run), "--prompt-tokens", "9:3"], "LO:HI"),
                         (["--run", str(tiny_run), "--prompt-tokens", "30:30"], "context of 32")):
        assert bench_server.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
