"""`python -m infer.bench_server`: the HTTP server under real load, against itself with one slot.

    python -m infer.bench_server --run runs/quickstart [--slots 8] [--rates 1,2,4,max] [--requests 32] [--out FILE]

Starts two servers (`python -m infer serve` subprocesses on free 127.0.0.1 ports): one with
`--slots N` (continuous batching) and one with `--slots 1` (one request at a time), then sends the
same streamed `/v1/completions` requests to each, after one unmeasured pass of them, scenario by
scenario (the two servers take turns, the first one alternating, so a change of load on a shared
machine hits both alike):

- a scenario per rate: Poisson arrivals (exponential gaps, seeded) at that many requests/s, and
  "max": every request sent at once (full concurrency);
- the requests: `--requests` prompts of token ids sliced from standard-library source encoded with
  the model's own tokenizer, prompt and output lengths drawn uniformly from `--prompt-tokens` and
  `--output-tokens` (seeded; clipped to the model's context), greedy (`temperature` 0), so both
  servers generate the same tokens. There is no ignore-EOS option: a request may stop early at EOS,
  and the generated token counts are what the table reports.

Per scenario and server: output tokens/s (generated tokens of the completed requests / wall time
from the first send to the last completion), and p50/p99 of TTFT (send to the first non-empty text
delta), TPOT ((e2e - TTFT) / (completion tokens - 1)), ITL (time between successive text deltas;
a delta may carry several tokens when text is held back, e.g. half a UTF-8 character, or when the
server sends one chunk for the tokens of a stream that fell behind) and e2e
latency; then the ratio of output tokens/s (N slots / 1 slot). Every request has the scenario's
time limit (`--time-limit`); one still running then is cancelled (counted as not completed).

With `--response-format json_schema` (or `json_object`) every scenario also runs, on each server
right after its plain run, with that response_format on every request (bench_response_format: a bounded
object of strings, integers, enums and an array), and the report adds the structured-output
overhead: TPOT p50 with the schema / TPOT p50 without, per scenario and server (constrained decoding
computes a token mask per step and runs the decode loop unpipelined; infer/structured.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import numpy as np

# Standard-library source: text every Python model of this project has seen the like of, present
# wherever the interpreter is (the quickstart model was trained on it).
CORPUS_FILES = ("argparse.py", "textwrap.py", "json/decoder.py", "string.py", "functools.py")
CORPUS_CHARS = 40_000  # per file: plenty of distinct slices, a quick encode
MODEL_NAME = "bench"


class UserError(Exception):
    """A mistake in the command line: one line on stderr, exit code 2."""


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    sent: float  # perf_counter at send
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # seconds from send to the first non-empty text delta
    e2e: float | None = None  # seconds from send to the end of the stream
    itl: list[float] = dataclasses.field(default_factory=list)  # gaps between successive text deltas
    completion_tokens: int = 0
    finished: float | None = None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.completion_tokens - 1)


# ---- the workload ---------------------------------------------------------------------------------

def corpus_text() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    return "\n".join((root / f).read_text(encoding="utf-8")[:CORPUS_CHARS] for f in CORPUS_FILES)


def make_workload(corpus_ids: np.ndarray, n: int, seed: int, prompt_range: tuple[int, int],
                  output_range: tuple[int, int], context: int) -> list[BenchRequest]:
    """n requests: a prompt of a length drawn from prompt_range (inclusive) sliced at a random
    offset of corpus_ids, and max_tokens drawn from output_range, clipped so prompt + output fit
    the context. The same (seed, n, ranges) always gives the same requests."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
        start = int(rng.integers(0, len(corpus_ids) - length))
        max_tokens = int(rng.integers(output_range[0], output_range[1] + 1))
        out.append(BenchRequest([int(t) for t in corpus_ids[start:start + length]], min(max_tokens, context - length)))
    return out


def arrival_offsets(n: int, rate: float, seed: int) -> np.ndarray:
    """Seconds after the scenario's start at which each request is sent: a Poisson process at
    `rate` requests/s (the first at 0), or all at 0 when rate is infinite."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


RESPONSE_FORMAT_NAMES = ("json_object", "json_schema")


def bench_response_format(name: str) -> dict:
    """The response_format of `--response-format NAME` (a new dict per call: no module state). The
    json_schema one bounds every output (strings by maxLength, the array by maxItems) and is long
    enough that TPOT is measured over many constrained tokens."""
    if name == "json_object":
        return {"type": "json_object"}
    schema = {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "kind": {"enum": ["function", "class", "module", "test"]},
            "lines": {"type": "integer", "minimum": 0, "maximum": 100000},
            "args": {"type": "array", "maxItems": 6, "items": {
                "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                 "optional": {"type": "boolean"}},
                "required": ["name", "optional"], "additionalProperties": False}},
            "summary": {"type": "string", "maxLength": 120},
        },
        "required": ["title", "kind", "lines", "args", "summary"], "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema, "strict": True}}


def request_body(req: BenchRequest, response_format: dict | None = None) -> dict:
    """The JSON body of one streamed completion, with `response_format` when given (the same
    scenarios then measure structured output's overhead)."""
    body = {"model": MODEL_NAME, "prompt": req.prompt_ids, "max_tokens": req.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if response_format is not None:
        body["response_format"] = response_format
    return body


# ---- the client -----------------------------------------------------------------------------------

async def _one(client, base: str, req: BenchRequest, res: RequestResult, response_format: dict | None = None) -> None:
    """Send one streamed completion and time its deltas into `res`. The stream is read as raw
    bytes and split into server-sent events here (cheaper than httpx's line iterator on a machine
    whose cores the server shares); each event is timed when the bytes holding it arrive."""
    last, done = None, False
    async with client.stream("POST", base + "/v1/completions", json=request_body(req, response_format)) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            res.error = f"HTTP {resp.status_code}: {body[:200]}"
            return
        buffer = b""
        async for piece in resp.aiter_raw():
            now = time.perf_counter()
            buffer += piece
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                data = event[6:]
                if data == b"[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    res.error = str(obj["error"].get("message", obj["error"]))[:200]
                    return
                if obj.get("usage"):
                    res.completion_tokens = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices", []):
                    if choice.get("text"):
                        if last is None:
                            res.ttft = now - res.sent
                        else:
                            res.itl.append(now - last)
                        last = now
            if done:
                break
    if not done:
        res.error = "the stream ended without data: [DONE]"
        return
    res.finished = time.perf_counter()
    res.e2e = res.finished - res.sent
    res.ok = True


async def run_scenario(base: str, requests: list[BenchRequest], offsets: np.ndarray,
                       time_limit: float, response_format: dict | None = None) -> tuple[list[RequestResult], float]:
    """Send requests[i] at offsets[i] seconds after the start (every one as its own connection,
    no client-side limit on concurrency); (results, wall seconds from the start to the last
    completion). A request not done time_limit seconds after the start is cancelled."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(time_limit + 30)) as client:
        start = time.perf_counter()
        results = [RequestResult(sent=math.nan) for _ in requests]

        async def fire(i: int) -> None:
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            results[i].sent = time.perf_counter()
            try:
                await _one(client, base, requests[i], results[i], response_format)
            except httpx.HTTPError as e:
                results[i].error = f"{type(e).__name__}: {e}"[:200]

        tasks = [asyncio.ensure_future(fire(i)) for i in range(len(requests))]
        done, pending = await asyncio.wait(tasks, timeout=time_limit)
        for t in pending:  # closing the stream is a disconnect: the server frees the slot
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for i, t in enumerate(tasks):
            if t in pending:
                results[i].error = f"not done within the time limit ({time_limit:g} s)"
            elif t.exception() is not None:
                results[i].error = f"{type(t.exception()).__name__}: {t.exception()}"[:200]
    finished = [r.finished for r in results if r.ok]
    wall = (max(finished) - start) if finished else time.perf_counter() - start
    return results, wall


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else math.nan


def summarize(results: list[RequestResult], wall: float) -> dict:
    """Throughput and latency percentiles (seconds) of one scenario on one server."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    series = {"ttft": [r.ttft for r in ok if r.ttft is not None], "tpot": [r.tpot for r in ok if r.tpot is not None],
              "itl": [x for r in ok for x in r.itl], "e2e": [r.e2e for r in ok]}
    out = {"requests": len(results), "completed": len(ok), "output_tokens": tokens, "wall_s": wall,
           "output_tok_s": tokens / wall if wall > 0 else math.nan,
           "errors": sorted({r.error for r in results if r.error})[:5]}
    for k, v in series.items():
        out[f"{k}_p50"], out[f"{k}_p99"] = _pct(v, 50), _pct(v, 99)
    return out


# ---- the servers ----------------------------------------------------------------------------------

class ServerProcess:
    """`python -m infer serve --run bench=RUN --port 0 --slots N` on 127.0.0.1; ready when /health is 200."""

    def __init__(self, run: str, slots: int, max_queue: int, startup_timeout: float):
        self.slots = slots
        self.lines: list[str] = []
        self.port: int | None = None
        cmd = [sys.executable, "-m", "infer", "serve", "--run", f"{MODEL_NAME}={Path(run).resolve()}", "--host", "127.0.0.1",
               "--port", "0", "--slots", str(slots), "--max-queue", str(max_queue), "--log-level", "warning",
               "--memory", ":memory:"]  # no conversation store: two servers on one run dir share no SQLite file
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._port_seen = threading.Event()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self.base = ""
        self._deadline = time.monotonic() + startup_timeout

    def _read_stderr(self) -> None:  # keeps draining, so the server never blocks on a full pipe
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._port_seen.set()
        self._port_seen.set()

    def wait_ready(self) -> None:
        """Poll /health until 200, the process exits, or the start-up deadline passes."""
        import httpx

        if not self._port_seen.wait(max(0.0, self._deadline - time.monotonic())) or self.port is None:
            self.stop()
            raise RuntimeError(f"the --slots {self.slots} server did not start:\n" + "\n".join(self.lines[-20:]))
        self.base = f"http://127.0.0.1:{self.port}"
        while time.monotonic() < self._deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the --slots {self.slots} server exited with {self.proc.returncode}:\n"
                                   + "\n".join(self.lines[-20:]))
            try:
                if httpx.get(self.base + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the --slots {self.slots} server was not healthy before the start-up timeout")

    def stop(self, grace_s: float = 60.0) -> int | None:
        """SIGTERM (the server drains and exits 0), then wait; kill only past grace_s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ---- the report -----------------------------------------------------------------------------------

def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu}, {usable} of {os.cpu_count()} CPUs usable, load average (1/5/15 min) {load}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "fastapi", "uvicorn", "httpx"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.0f}" if x >= 0.1 else f"{x * 1e3:.1f}"


def format_table(rows: list[dict], ratios: dict[str, float]) -> str:
    head = ("| scenario | slots | format | done/sent | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
            "| ITL p50 / p99 (ms) | e2e p50 / p99 (ms) | tok/s N : 1 |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        fmt = r.get("format", "text")
        ratio = f"{ratios[r['scenario']]:.2f}x" if r["slots"] != 1 and fmt == "text" and r["scenario"] in ratios \
            else ""
        lines.append(f"| {r['scenario']} | {r['slots']} | {fmt} | {r['completed']}/{r['requests']} "
                     f"| {r['output_tok_s']:.1f} "
                     + " ".join(f"| {_ms(r[k + '_p50'])} / {_ms(r[k + '_p99'])}" for k in ("ttft", "tpot", "itl", "e2e"))
                     + f" | {ratio} |")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------

def _range(flag: str, text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UserError(f"{flag}={text} must be LO:HI with 1 <= LO <= HI (e.g. 16:64)")
    return int(m.group(1)), int(m.group(2))


def _rates(text: str) -> list[tuple[str, float]]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part == "max":
            out.append(("max", math.inf))
            continue
        try:
            rate = float(part)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate > 0):
            raise UserError(f"--rates: {part!r} is not a rate; give requests/s > 0 or 'max' (e.g. 1,2,4,max)")
        out.append((f"{rate:g} req/s", rate))
    if len({name for name, _ in out}) != len(out):
        raise UserError(f"--rates={text} names a rate twice")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infer.bench_server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (or its checkpoints/) to serve")
    p.add_argument("--slots", type=int, default=8, help="slots of the batching server (default 8); the other has 1")
    p.add_argument("--rates", default="1,2,4,max", help="Poisson arrival rates in requests/s, 'max' = all at once")
    p.add_argument("--requests", type=int, default=32, help="requests per scenario (default 32)")
    p.add_argument("--prompt-tokens", default="16:48", help="prompt length range in tokens, LO:HI (default 16:48)")
    p.add_argument("--output-tokens", default="16:64", help="max_tokens range, LO:HI (default 16:64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts, lengths and arrivals (default 0)")
    p.add_argument("--time-limit", type=float, default=300.0,
                   help="seconds a scenario may take on one server; what still runs then is cancelled (default 300)")
    p.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds a server may take to load and compile (default 900)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--response-format", choices=RESPONSE_FORMAT_NAMES, default=None,
                   help="also run every scenario with this response_format and report the TPOT ratio "
                        "(structured output's overhead)")
    return p


def check_args(args: argparse.Namespace) -> tuple[list[tuple[str, float]], tuple[int, int], tuple[int, int]]:
    if not Path(args.run).is_dir():
        raise UserError(f"--run={args.run}: no such run or checkpoint directory")
    if not 2 <= args.slots <= 1024:
        raise UserError(f"--slots={args.slots} must be in [2, 1024] (the baseline server has 1)")
    if not 1 <= args.requests <= 10_000:
        raise UserError(f"--requests={args.requests} must be in [1, 10000]")
    if not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise UserError(f"--time-limit={args.time_limit} must be > 0 seconds")
    if not (math.isfinite(args.startup_timeout) and args.startup_timeout > 0):
        raise UserError(f"--startup-timeout={args.startup_timeout} must be > 0 seconds")
    if args.out is not None and not Path(args.out).resolve().parent.is_dir():
        raise UserError(f"--out={args.out}: its directory does not exist")
    return _rates(args.rates), _range("--prompt-tokens", args.prompt_tokens), _range("--output-tokens", args.output_tokens)


def load_workload(args, prompt_range, output_range) -> tuple[list[BenchRequest], int]:
    """The requests, made with the checkpoint's own tokenizer; (requests, model context)."""
    from model.checkpoint import read_checkpoint_meta
    from model.config import model_config_from_dict
    from model.tokenizer import tokenizer_from_json

    try:
        _, config, tokenizer_json = read_checkpoint_meta(args.run)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    context = model_config_from_dict(config.get("model", {})).max_seq_len
    if prompt_range[1] + output_range[0] > context:
        raise UserError(f"--prompt-tokens={args.prompt_tokens} --output-tokens={args.output_tokens}: the longest "
                        f"prompt plus the shortest output ({prompt_range[1] + output_range[0]}) exceeds the model's "
                        f"context of {context} tokens")
    tokenizer = tokenizer_from_json(tokenizer_json)
    ids = tokenizer.encode(corpus_text())
    ids = ids[ids != tokenizer.eos_id]  # slices of text; an EOS inside a prompt would be out of place
    if len(ids) <= prompt_range[1]:
        raise UserError(f"--prompt-tokens={args.prompt_tokens}: the corpus holds only {len(ids)} tokens")
    return make_workload(ids, args.requests, args.seed, prompt_range, output_range, context), context


def bench(args: argparse.Namespace) -> dict:
    """Run every scenario on both servers; the results as a JSON-ready dict (see report())."""
    rates, prompt_range, output_range = check_args(args)
    requests, context = load_workload(args, prompt_range, output_range)
    machine_before = machine_line()
    servers: dict[int, ServerProcess] = {}
    rows, exits = [], {}
    t0 = time.monotonic()
    try:
        # both start (load + compile) at once; each is ready before any load is sent
        for slots in (args.slots, 1):
            servers[slots] = ServerProcess(args.run, slots, args.requests, args.startup_timeout)
        for s in servers.values():
            s.wait_ready()
        print(f"# both servers ready after {time.monotonic() - t0:.0f} s (load + compile)", file=sys.stderr, flush=True)
        # Warm-up, not measured: the whole workload once at full concurrency on each server. Whatever
        # the first requests after start-up pay (first runs of each program; on the quickstart model
        # the first prefill of bucket 64 compiled again, 4.5 s) is then out of every scenario.
        formats = [("text", None)]
        if args.response_format:
            formats.append((args.response_format, bench_response_format(args.response_format)))
        for s in servers.values():
            for _, fmt in formats:  # (the schema compiles here, once per server, then comes from the cache)
                asyncio.run(run_scenario(s.base, requests, np.zeros(len(requests)), args.time_limit, fmt))
        print(f"# warmed up after {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        for k, (name, rate) in enumerate(rates):
            offsets = arrival_offsets(len(requests), rate, args.seed + 1 + k)
            order = [args.slots, 1] if k % 2 == 0 else [1, args.slots]
            for slots in order:
                for fmt_name, fmt in formats:
                    results, wall = asyncio.run(run_scenario(servers[slots].base, requests, offsets, args.time_limit,
                                                             fmt))
                    row = {"scenario": name, "rate": None if math.isinf(rate) else rate, "slots": slots,
                           "format": fmt_name, **summarize(results, wall)}
                    rows.append(row)
                    print(f"# {name}, {slots} slot(s), {fmt_name}: {row['completed']}/{row['requests']} done, "
                          f"{row['output_tok_s']:.1f} output tok/s", file=sys.stderr, flush=True)
    finally:
        for slots, s in servers.items():
            exits[slots] = s.stop()
    tps = {(r["scenario"], r["slots"]): r["output_tok_s"] for r in rows if r["format"] == "text"}
    ratios = {name: tps[(name, args.slots)] / tps[(name, 1)] if tps[(name, 1)] > 0 else math.nan
              for name, _ in rates}
    tpot = {(r["scenario"], r["slots"], r["format"]): r["tpot_p50"] for r in rows}
    fmt = args.response_format
    overhead = [{"scenario": name, "slots": slots, "format": fmt, "tpot_p50_text": tpot[(name, slots, "text")],
                 "tpot_p50_format": tpot[(name, slots, fmt)],
                 "ratio": tpot[(name, slots, fmt)] / tpot[(name, slots, "text")]}
                for name, _ in rates for slots in (args.slots, 1)] if fmt else []
    rows.sort(key=lambda r: ([n for n, _ in rates].index(r["scenario"]), r["slots"] == 1, r["format"] != "text"))
    tokens = [len(r.prompt_ids) for r in requests], [r.max_tokens for r in requests]
    return {
        "command": " ".join(["python -m infer.bench_server", *args.argv]),
        "machine_before": machine_before, "machine_after": machine_line(), "versions": versions(),
        "workload": {"requests": len(requests), "seed": args.seed, "context": context,
                     "prompt_tokens": {"range": list(prompt_range), "mean": float(np.mean(tokens[0]))},
                     "max_tokens": {"range": list(output_range), "mean": float(np.mean(tokens[1]))},
                     "corpus": [f"stdlib/{f}" for f in CORPUS_FILES], "temperature": 0.0},
        "slots": args.slots, "rows": rows, "ratios": ratios, "server_exit_codes": exits,
        "response_format": bench_response_format(args.response_format) if args.response_format else None,
        "format_overhead": overhead,
    }


def report(out: dict) -> str:
    w = out["workload"]
    return "\n".join([
        f"# machine: {out['machine_before']}",
        f"# after:   {out['machine_after']}",
        "# versions: " + ", ".join(f"{k} {v}" for k, v in out["versions"].items()),
        f"# workload: {w['requests']} requests per scenario (seed {w['seed']}), prompts {w['prompt_tokens']['range'][0]}-"
        f"{w['prompt_tokens']['range'][1]} tokens (mean {w['prompt_tokens']['mean']:.1f}), max_tokens "
        f"{w['max_tokens']['range'][0]}-{w['max_tokens']['range'][1]} (mean {w['max_tokens']['mean']:.1f}), "
        f"greedy, context {w['context']}; servers: --slots {out['slots']} and --slots 1, same requests",
        format_table(out["rows"], out["ratios"]),
    ] + _overhead_table(out.get("format_overhead") or []) + [
        f"# errors ({r['scenario']}, {r['slots']} slots, {r.get('format', 'text')}): {'; '.join(r['errors'])}"
        for r in out["rows"] if r["errors"]])


def _overhead_table(overhead: list[dict]) -> list[str]:
    """Structured output's cost: TPOT p50 with the response_format / without, per scenario and server."""
    if not overhead:
        return []
    lines = ["", f"# structured output ({overhead[0]['format']}): time per output token with / without",
             "| scenario | slots | TPOT p50 text (ms) | TPOT p50 with format (ms) | ratio |",
             "| --- | --- | --- | --- | --- |"]
    for o in overhead:
        lines.append(f"| {o['scenario']} | {o['slots']} | {_ms(o['tpot_p50_text'])} | {_ms(o['tpot_p50_format'])} "
                     f"| {o['ratio']:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    # Orbax logs routine notes about its read-only manager as absl warnings; stderr is for progress
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        out = bench(args)
    except UserError as e:
        print(f"python -m infer.bench_server: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a server that did not start: its own last lines say why
        print(f"python -m infer.bench_server: {e}", file=sys.stderr)
        return 1
    print(report(out), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, allow_nan=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
