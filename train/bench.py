"""Training-speed benchmark: jaxlm's train step against the same model and optimizer in eager PyTorch.

    python -m train.bench                          # shakespeare_char_cpu model + the larger shakespeare_char model
    python -m train.bench --models small --steps 200
    python -m train.bench --models large --batch-large 8

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="small,large", help="comma-separated: small, large (default both)")
    parser.add_argument("--steps", type=int, default=100, help="timed train steps per framework (default 100)")
    parser.add_argument("--block", type=int, default=5, help="steps per interleaved block (default 5)")
    parser.add_argument("--batch-large", type=int, default=4,
                        help="batch size of the large model (default 4; its recipe's 64 takes ~15 s a step on 2 cores)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args(argv)
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
