"""Training-speed benchmark: jaxlm's train step against the same model and optimizer in eager PyTorch.

    python -m train.bench                          # shakespeare_char_cpu model + the larger shakespeare_char model
    python -m train.bench --models small --steps 200
    python -m train.bench --models large --batch-large 8
    python -m train.bench --end-to-end data.path=tinyshakespeare.txt   # the whole command, see below

For each model it prints the median time of a full training step (forward, loss, backward,
gradient clipping, AdamW) over `--steps` steps after warm-up, tokens/s, the forward and the
backward pass separately (backward = forward+backward - forward), MFU against a float32 matmul
peak measured in the same run, and the compile time of jaxlm's step; the same figures for a plain
PyTorch version of the model (train/torch_baseline.py: nanoGPT's code, eager, same thread count)
and the ratio PyTorch time / jaxlm time (> 1: jaxlm is faster). "step CPU ms" is the process's CPU
time per step over all its threads: on a machine shared with other work it shows how much of the
wall time was waiting for a core.

Each framework runs in a process of its own: jaxlm in this one, PyTorch in a worker process
(spawned, same thread count) that this one drives through a pipe, so neither framework's thread
pool competes with the other's inside one process (a jaxlm step timed right after torch steps in
the same process took 136 ms against 62 ms alone: torch's OpenMP threads keep running after a step
returns). Their timing blocks are interleaved (`--block` steps of jaxlm, then `--block` steps of
PyTorch, ...), and only one side runs at a time, so load from other processes on a shared machine
hits both alike; medians are of per-step times, each timed inside its own process.

PyTorch's OpenMP threads keep torch's own default waiting policy (spin briefly, then sleep) unless
the environment sets OMP_WAIT_POLICY; the header prints which. That default is torch at its best
on an idle machine: a 2-thread baseline step of the shakespeare_char_cpu model took 30-36 ms with
it and 61 ms with OMP_WAIT_POLICY=PASSIVE (each OpenMP region then waits for sleeping threads to
wake), and greedy decoding 36 against 188 ms. An earlier version of this benchmark forced PASSIVE
and so reported ratios against a baseline twice slower than torch can run (see
experiments/results.md, issue 7). On a machine shared with other work, spinning threads compete
for cores: there, set OMP_WAIT_POLICY=PASSIVE yourself and say so with the figures. Without torch
installed the PyTorch columns are skipped with a note (`pip install jaxlm[bench]`).

`--end-to-end` times the whole shakespeare_char_cpu recipe as a user runs it (`python -m train
<recipe> <overrides>` in a fresh process, imports, data, compile, evaluation, checkpoints, samples
and exit included) against train/torch_e2e.py, an eager PyTorch script that does what nanoGPT's
train.py does for the recipe (same model, data, schedule, evaluation and checkpoint cadence), also
in a fresh process. The two alternate (`--repeats` runs each: jaxlm, PyTorch, jaxlm, ...); the
table gives the medians of wall time (process start to exit) and peak resident set (the child's
rusage), the val loss each reached, jaxlm's XLA compile time per run (0 once the persistent
compilation cache holds the recipe, train/compile_cache.py) and the ratios. Overrides go to both
commands. On a loaded machine pass OMP_WAIT_POLICY=PASSIVE (inherited by both; see below): torch's
spinning OpenMP threads made its steps 40x slower at a load of 15 on 2 cores.

This process turns on sharding/host_memory.py (as `python -m train` does) before JAX starts, and the
header says so: without it every jaxlm step page-faults in its temporaries afresh. The PyTorch
worker keeps glibc's defaults: its eager step makes few faults and measured no faster with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
RECIPES = {  # name -> (recipe, what it is)
    "small": (REPO / "experiments" / "shakespeare_char_cpu.yaml", "shakespeare_char_cpu"),
    "large": (REPO / "experiments" / "shakespeare_char.yaml", "shakespeare_char (6 x 384, 256 context)"),
}


@dataclasses.dataclass
class Case:
    """One benchmarked configuration: a model config, an optimizer config and the batch shape."""

    name: str
    model: object  # ModelConfig
    optim: object  # OptimConfig
    batch: int
    seq: int
    splits: int = 1  # train.batch_splits of the recipe

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def load_case(key: str, batch: int | None = None) -> Case:
    """The model, optimizer and batch of a recipe (vocab 65: the character tokenizer of tiny
    Shakespeare); dropout off, so both frameworks run the same arithmetic."""
    from train.config import load_config

    path, name = RECIPES[key]
    cfg = load_config(path, ["model.vocab_size=65", "model.dropout=0.0"])
    return Case(name, cfg.model, cfg.optim, batch or cfg.train.batch_size, cfg.data.seq_len, cfg.train.batch_splits)


def random_batch(case: Case, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (case.batch, case.seq)
    return rng.integers(0, case.model.vocab_size, shape), rng.integers(0, case.model.vocab_size, shape)


class JaxRunner:
    """jaxlm's own train step (train/step.py) and its forward / forward+backward, jitted."""

    def __init__(self, case: Case, total_steps: int):
        import jax
        import jax.numpy as jnp

        from model.transformer import build_model
        from train.optim import learning_rate_schedule, make_optimizer
        from train.step import init_train_state, make_loss_fn, make_train_step

        self.jax = jax
        tx = make_optimizer(case.optim, total_steps)
        graphdef, self.state = init_train_state(build_model(case.model, seed=0), tx, seed=0)
        inputs, targets = random_batch(case)
        self.batch = {"inputs": jnp.asarray(inputs, jnp.int32), "targets": jnp.asarray(targets, jnp.int32)}
        self._step = make_train_step(graphdef, tx, learning_rate_schedule(case.optim, total_steps),
                                     batch_splits=case.splits)
        loss_fn = make_loss_fn(graphdef, case.splits)
        self._fwd = jax.jit(lambda p, b: loss_fn(p, b, None))
        self._fwd_bwd = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)))
        t0 = time.perf_counter()
        self.step()  # the first call traces, compiles and runs once
        self.compile_s = time.perf_counter() - t0
        self.forward()
        self.forward_backward()

    def step(self):
        self.state, metrics = self._step(self.state, self.batch)
        self.jax.block_until_ready(metrics)

    def forward(self):
        self._fwd(self.state.params, self.batch).block_until_ready()

    def forward_backward(self):
        self.jax.block_until_ready(self._fwd_bwd(self.state.params, self.batch))


class TorchRunner:
    """The same model and AdamW in eager PyTorch (train/torch_baseline.py)."""

    def __init__(self, case: Case, threads: int):
        import torch

        from train import torch_baseline

        self.torch, self.tb = torch, torch_baseline
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.model = torch_baseline.TorchGPT(case.model)
        o = case.optim
        self.opt = torch_baseline.make_optimizer(self.model, o.lr, (o.beta1, o.beta2), o.weight_decay, o.eps)
        self.clip = o.clip_norm
        inputs, targets = random_batch(case)
        self.inputs, self.targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        for _ in range(2):
            self.step()

    def _loss(self):
        logits = self.model(self.inputs)
        return self.torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), self.targets.view(-1))

    def step(self):
        self.tb.train_step(self.model, self.opt, self.inputs, self.targets, self.clip).item()

    def forward(self):
        self._loss().item()  # with autograd on, as in training

    def forward_backward(self):
        self.model.zero_grad(set_to_none=True)
        self._loss().backward()


def timed_calls(fn: Callable[[], None], k: int) -> tuple[list[float], list[float]]:
    """Wall time and process CPU time (all threads of this process) of each of `k` calls of fn."""
    times, cpu = [], []
    for _ in range(k):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def _torch_worker_main(conn, factory: Callable, args: tuple) -> None:
    """The PyTorch worker process: builds `factory(*args)` (a runner whose methods run torch
    work), then answers requests from the parent process until told to stop:
    ("run", method, k) -> per-call (wall, CPU) times of k calls; ("call", method) -> the method's
    result; ("peak",) -> torch's float32 matmul FLOP/s; ("stop",)."""
    runner = factory(*args)
    import torch

    conn.send({"version": torch.__version__, "pid": os.getpid()})
    while True:
        msg = conn.recv()
        if msg[0] == "run":
            conn.send(timed_calls(getattr(runner, msg[1]), msg[2]))
        elif msg[0] == "call":
            conn.send(getattr(runner, msg[1])())
        elif msg[0] == "peak":
            conn.send(torch_matmul_flops())
        else:
            conn.close()
            return


class TorchWorker:
    """The bench process's handle on a PyTorch worker process (see module docstring): the runner
    `factory(*args)` lives in a freshly spawned interpreter (no jax, no XLA threads); factory and
    args must pickle (a module-level class and plain data)."""

    def __init__(self, factory: Callable, *args):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_worker_main, args=(child, factory, args), daemon=True)
        self.proc.start()
        child.close()
        hello = self._recv()
        self.version, self.pid = hello["version"], hello["pid"]

    def _recv(self):
        try:
            return self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the PyTorch worker process died (exit code {self.proc.exitcode})") from None

    def timed(self, method: str, k: int) -> tuple[list[float], list[float]]:
        self.conn.send(("run", method, k))
        return self._recv()

    def call(self, method: str):
        self.conn.send(("call", method))
        return self._recv()

    def matmul_flops(self) -> float:
        self.conn.send(("peak",))
        return self._recv()

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            self.proc.join(timeout=30)
        self.conn.close()


def interleaved(runners: dict[str, Callable[[int], tuple[list[float], list[float]]]], n: int, block: int):
    """Per-call wall and CPU times of each runner, `n` calls each, alternating blocks of `block`
    calls; `runners[k](m)` makes m calls and returns their (wall, CPU) times."""
    times, cpu = {k: [] for k in runners}, {k: [] for k in runners}
    while min(len(t) for t in times.values()) < n:
        for k, run in runners.items():
            m = min(block, n - len(times[k]))
            if m:
                t, c = run(m)
                times[k] += t
                cpu[k] += c
    return times, cpu


def torch_matmul_flops(n: int = 512, min_time_s: float = 0.3) -> float:
    import torch

    a = torch.ones(n, n)
    a @ a
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time_s:
        a @ a
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity, as XLA does)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{cpu}, {usable_cpus()} of {os.cpu_count()} CPUs usable, load average (1/5/15 min) {load}"


def bench_case(case: Case, steps: int, block: int, torch_threads: int | None) -> dict:
    """Time one case; returns {framework: {step, fwd, bwd (seconds, medians), compile, pid}}:
    jaxlm in this process, PyTorch (with `torch_threads`) in a worker process."""
    jax_runner = JaxRunner(case, total_steps=max(steps * 4, 100))
    runners = {"jaxlm": lambda method, k: timed_calls(getattr(jax_runner, method), k)}
    out = {"jaxlm": {"compile": jax_runner.compile_s, "pid": os.getpid()}}
    worker = TorchWorker(TorchRunner, case, torch_threads) if torch_threads else None
    try:
        if worker:
            runners["PyTorch"] = worker.timed
            out["PyTorch"] = {"compile": 0.0, "pid": worker.pid}  # eager: nothing to compile
        # Whole steps first (the headline), then forward and forward+backward, each interleaved.
        for what, n in (("step", steps), ("fwd", max(steps // 2, 5)), ("fwd_bwd", max(steps // 2, 5))):
            method = {"step": "step", "fwd": "forward", "fwd_bwd": "forward_backward"}[what]
            times, cpu = interleaved({k: (lambda m, r=r: r(method, m)) for k, r in runners.items()}, n, block)
            for k, t in times.items():
                out[k][what] = statistics.median(t)
                out[k][what + "_cpu"] = statistics.median(cpu[k])
    finally:
        if worker:
            worker.close()
    for v in out.values():
        v["bwd"] = v["fwd_bwd"] - v["fwd"]
    return out


def torch_worker_note(threads: int, version: str = "") -> str:
    """The header's description of the PyTorch worker (both benchmarks)."""
    torch = f"torch {version}".rstrip()
    return (f"{torch} in a worker process, {threads} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (torch default)')}")


def torch_worker_peak(threads: int) -> tuple[float, str]:
    """torch's float32 matmul FLOP/s and version, measured in a short-lived worker process (this
    process never imports torch)."""
    worker = TorchWorker(TorchRunner, load_case("small"), threads)
    try:
        return worker.matmul_flops(), worker.version
    finally:
        worker.close()


# ---- the whole command: python -m train.bench --end-to-end ---------------------------------

E2E_RECIPE = REPO / "experiments" / "shakespeare_char_cpu.yaml"
MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "norm_eps", "init_std", "norm",
                "positions", "mlp", "bias", "tie_embeddings", "ff_dim", "head_dim", "kv_heads")


def torch_e2e_spec(cfg, out_dir: Path) -> dict:
    """What train/torch_e2e.py needs of a resolved jaxlm experiment config: a character-level
    recipe on one text file (nanoGPT's shakespeare_char); anything else is a ValueError."""
    from train.data import sources

    d = cfg.data
    if d.tokenizer != "char" or d.source not in ("tinyshakespeare", "files"):
        raise ValueError(f"--end-to-end compares character-level recipes on one text file (nanoGPT's "
                         f"shakespeare_char); this one has data.source={d.source!r}, data.tokenizer={d.tokenizer!r}")
    if d.source == "files":
        path = Path(os.path.expanduser(d.path))
        if not path.is_file():
            raise ValueError(f"--end-to-end needs data.path to be one text file, not {d.path!r}")
    elif d.path:
        path = Path(os.path.expanduser(d.path))
    else:
        path = sources.download(sources.TINYSHAKESPEARE_URL, d.cache_dir, sources.TINYSHAKESPEARE_SHA256)
    t, o = cfg.train, cfg.optim
    return {
        "model": {k: getattr(cfg.model, k) for k in MODEL_FIELDS},
        "optim": {"lr": o.lr, "min_lr": o.min_lr, "warmup_steps": o.warmup_steps,
                  "decay_steps": o.decay_steps or t.steps, "beta1": o.beta1, "beta2": o.beta2,
                  "weight_decay": o.weight_decay, "eps": o.eps, "clip_norm": o.clip_norm},
        "train": {k: getattr(t, k) for k in ("steps", "batch_size", "eval_every", "eval_batches", "log_every",
                                              "sample_tokens", "sample_prompt", "seed")},
        "data": {"path": str(path), "seq_len": d.seq_len, "val_fraction": d.val_fraction},
        "checkpoint_every": cfg.checkpoint.every,
        "out_dir": str(out_dir),
    }


def run_command(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` in a fresh process; its wall time (start to exit), peak resident set (from
    wait4's rusage of that child) and exit status. Output goes to `log`."""
    import subprocess

    with log.open("w") as f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss * 1024 / 1e6, "rc": proc.returncode,
            "cpu_s": usage.ru_utime + usage.ru_stime}


def end_to_end(recipe: Path, overrides: list[str], repeats: int, work: Path) -> dict:
    """Time the whole jaxlm command and the PyTorch script (train/torch_e2e.py), each in a fresh
    process, alternating (jaxlm, PyTorch, jaxlm, ...) `repeats` times; returns both lists of runs."""
    import json

    from train.config import load_config

    cfg = load_config(recipe, overrides)
    work.mkdir(parents=True, exist_ok=True)
    runs = {"jaxlm": [], "PyTorch": []}
    for i in range(repeats):
        jdir, tdir = work / f"jaxlm_{i}", work / f"torch_{i}"
        spec = torch_e2e_spec(cfg, tdir)
        spec_path = work / f"torch_{i}.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        commands = {
            "jaxlm": [sys.executable, "-m", "train", str(recipe), *overrides, f"run.dir={jdir}", "train.progress=false"],
            "PyTorch": [sys.executable, "-m", "train.torch_e2e", str(spec_path)],
        }
        for name, out in (("jaxlm", jdir), ("PyTorch", tdir)):
            r = run_command(commands[name], work / f"{name}_{i}.log")
            if r["rc"] != 0:
                tail = (work / f"{name}_{i}.log").read_text()[-2000:]
                raise RuntimeError(f"the {name} command exited with {r['rc']}: {' '.join(commands[name])}\n{tail}")
            summary = json.loads((out / "summary.json").read_text())
            r["val_loss"] = summary["val_loss"]
            r["command"] = commands[name]
            if name == "jaxlm":
                timeline = json.loads((out / "timeline.json").read_text())
                r["compile_s"] = timeline["compile_s"]
                r["params_sha256"] = summary["params_sha256"]
                r["timeline"] = timeline
            runs[name].append(r)
            print(f"  {name} run {i + 1}/{repeats}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
                  f"val loss {r['val_loss']:.6f}, load {os.getloadavg()[0]:.1f}", flush=True)
    return runs


def end_to_end_table(runs: dict) -> str:
    """The --end-to-end table (markdown): medians, every run, and the ratios."""
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "peak_rss_mb", "val_loss", "cpu_s")}
           for k, v in runs.items()}
    lines = ["| command | wall s (median) | wall s (each) | peak RSS MB (median) | CPU s | val loss (whole split) "
             "| XLA compile s | PyTorch/jaxlm wall | jaxlm/PyTorch RSS |", "|" + " --- |" * 9]
    for k, v in runs.items():
        compile_s = " / ".join(f"{r['compile_s']:.1f}" for r in v) if k == "jaxlm" else "eager"
        ratios = (f"**{med['PyTorch']['wall_s'] / med['jaxlm']['wall_s']:.2f}x** | "
                  f"**{med['jaxlm']['peak_rss_mb'] / med['PyTorch']['peak_rss_mb']:.2f}x**") if k == "jaxlm" else " | "
        walls = " / ".join(f"{r['wall_s']:.1f}" for r in v)
        losses = " / ".join(f"{r['val_loss']:.6f}" for r in v)
        lines.append(f"| {k} | {med[k]['wall_s']:.1f} | {walls} | {med[k]['peak_rss_mb']:.0f} | {med[k]['cpu_s']:.0f} | "
                     f"{losses} | {compile_s} | {ratios} |")
    return "\n".join(lines)


def main_end_to_end(args) -> int:
    """`--end-to-end`: see end_to_end; prints the machine, versions, every run and the table."""
    import importlib.metadata
    import tempfile

    if importlib.util.find_spec("torch") is None:
        print("python -m train.bench: error: --end-to-end needs torch (pip install 'jaxlm[bench]')", file=sys.stderr)
        return 2
    from train.config import ConfigError

    versions = {n: importlib.metadata.version(n) for n in ("jax", "jaxlib", "flax", "torch")}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="jaxlm_e2e_"))
    print(f"machine: {machine_line()}")
    print(f"versions: python {platform.python_version()}, " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"environment: OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (torch default)')}, "
          f"JAXLM_COMPILE_CACHE={os.environ.get('JAXLM_COMPILE_CACHE', 'unset (on)')}, "
          f"JAXLM_KEEP_HOST_MEMORY={os.environ.get('JAXLM_KEEP_HOST_MEMORY', 'unset (on)')}")
    print(f"recipe: {args.recipe} {' '.join(args.overrides)}; {args.repeats} runs each, alternating, "
          f"each in a fresh process; runs in {work}", flush=True)
    try:
        runs = end_to_end(Path(args.recipe), args.overrides, args.repeats, work)
    except (ConfigError, ValueError) as e:
        print(f"python -m train.bench: error: {e}", file=sys.stderr)
        return 2
    print()
    print(end_to_end_table(runs))
    sha = {r["params_sha256"] for r in runs["jaxlm"]}
    print(f"\njaxlm params_sha256: {', '.join(sorted(sha))}")
    print(f"commands: {' '.join(runs['jaxlm'][0]['command'])}\n          {' '.join(runs['PyTorch'][0]['command'])}")
    print(f"load average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--end-to-end", action="store_true",
                        help="time the whole recipe command against train/torch_e2e.py (each in a fresh process)")
    parser.add_argument("--recipe", default=str(E2E_RECIPE), help="--end-to-end: the recipe (default shakespeare_char_cpu)")
    parser.add_argument("--repeats", type=int, default=2, help="--end-to-end: runs of each command (default 2)")
    parser.add_argument("--work-dir", default="", help="--end-to-end: where the runs go (default a new temp dir)")
    parser.add_argument("overrides", nargs="*", help="--end-to-end: section.key=value for both commands")
    parser.add_argument("--models", default="small,large", help="comma-separated: small, large (default both)")
    parser.add_argument("--steps", type=int, default=100, help="timed train steps per framework (default 100)")
    parser.add_argument("--block", type=int, default=5, help="steps per interleaved block (default 5)")
    parser.add_argument("--batch-large", type=int, default=4,
                        help="batch size of the large model (default 4; its recipe's 64 takes ~15 s a step on 2 cores)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args(argv)
    if args.end_to_end:
        if args.repeats < 1:
            parser.exit(2, "python -m train.bench: error: --repeats must be >= 1\n")
        return main_end_to_end(args)
    if args.overrides:
        parser.exit(2, "python -m train.bench: error: overrides are for --end-to-end only\n")
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in RECIPES]
    if bad or not keys:
        parser.exit(2, f"python -m train.bench: error: --models {args.models!r}: choose from {', '.join(RECIPES)}\n")
    if args.steps < 1 or args.block < 1 or args.batch_large < 1:
        parser.exit(2, "python -m train.bench: error: --steps, --block and --batch-large must be >= 1\n")

    from sharding.host_memory import keep_freed_host_memory_or_exit

    host_memory = keep_freed_host_memory_or_exit("python -m train.bench")  # before JAX's first computation
    import jax

    from train.metrics import measure_cpu_matmul_flops

    torch_note, threads = "", None
    if args.no_torch:
        torch_note = "PyTorch baseline skipped (--no-torch)"
    elif importlib.util.find_spec("torch") is None:
        torch_note = "PyTorch baseline skipped: torch is not installed (pip install 'jaxlm[bench]')"
    else:
        threads = usable_cpus()  # XLA's CPU client uses one thread per usable core

    device = jax.devices()[0]
    peak = measure_cpu_matmul_flops() if device.platform == "cpu" else float("nan")
    peak_note = f"XLA {peak / 1e9:.1f} GFLOP/s"
    if threads:
        tpeak, version = torch_worker_peak(threads)
        torch_note = torch_worker_note(threads, version)
        peak_note += f", torch {tpeak / 1e9:.1f} GFLOP/s"
        peak = max(peak, tpeak)
    print(f"machine: {machine_line()}")
    print(f"versions: python {platform.python_version()}, jax {jax.__version__}, device {device.device_kind}; {torch_note}")
    print(f"jaxlm keeps freed host memory (sharding/host_memory.py): {host_memory}")
    print(f"float32 matmul peak (512x512, measured now): {peak_note}; MFU uses the larger")
    print(f"each figure: median over {args.steps} steps (forward, backward: {max(args.steps // 2, 5)}), "
          f"interleaved in blocks of {args.block}, each framework in its own process\n")

    header = ("| model | batch x seq | framework | step ms | tokens/s | fwd ms | bwd ms | bwd/fwd | MFU | compile s "
              "| step CPU ms | PyTorch/jaxlm step |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    results = {}
    for key in keys:
        case = load_case(key, args.batch_large if key == "large" else None)
        res = bench_case(case, args.steps, args.block, threads)
        results[key] = res
        flops = case.model.flops_per_token(case.seq) * case.tokens
        for fw, r in res.items():
            ratio = f"{res['PyTorch']['step'] / res['jaxlm']['step']:.2f}x" if fw == "jaxlm" and "PyTorch" in res else ""
            compile_s = f"{r['compile']:.1f}" if fw == "jaxlm" else "eager"
            print(f"| {case.name} | {case.batch} x {case.seq} | {fw} | {r['step'] * 1e3:.1f} | "
                  f"{case.tokens / r['step']:,.0f} | {r['fwd'] * 1e3:.1f} | {r['bwd'] * 1e3:.1f} | "
                  f"{r['bwd'] / r['fwd']:.1f} | {flops / r['step'] / peak:.1%} | {compile_s} | {r['step_cpu'] * 1e3:.0f} | {ratio} |", flush=True)
    print(f"\nload average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
