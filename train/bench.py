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

Both run in one process and their timing blocks are interleaved (`--block` steps of one, then of
the other), so load from other processes on a shared machine hits both alike; medians are of
per-step times. PyTorch's OpenMP threads are set to wait passively (OMP_WAIT_POLICY=PASSIVE unless
the environment sets it): with the default spin-waiting, a torch step leaves its threads spinning
for a while after it returns, which steals the cores from XLA's threads in the same process (and,
on a loaded 2-core machine, slowed torch itself from 60 ms to 1.5 s per step). Without torch
installed the PyTorch columns are skipped with a note (`pip install jaxlm[bench]`).
"""

from __future__ import annotations

import argparse
import dataclasses
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

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def load_case(key: str, batch: int | None = None) -> Case:
    """The model, optimizer and batch of a recipe (vocab 65: the character tokenizer of tiny
    Shakespeare); dropout off, so both frameworks run the same arithmetic."""
    from train.config import load_config

    path, name = RECIPES[key]
    cfg = load_config(path, ["model.vocab_size=65", "model.dropout=0.0"])
    return Case(name, cfg.model, cfg.optim, batch or cfg.train.batch_size, cfg.data.seq_len)


def random_batch(case: Case, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    shape = (case.batch, case.seq)
    return rng.integers(0, case.model.vocab_size, shape), rng.integers(0, case.model.vocab_size, shape)


class JaxRunner:
    """jaxlm's own train step (train/step.py) and its forward / forward+backward, jitted."""

    label = "jaxlm"

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
        self._step = make_train_step(graphdef, tx, learning_rate_schedule(case.optim, total_steps))
        loss_fn = make_loss_fn(graphdef)
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

    label = "PyTorch"
    compile_s = 0.0

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


def interleaved(runners: dict[str, Callable[[], None]], n: int, block: int):
    """Per-call wall times of each runner, `n` calls each, alternating blocks of `block` calls;
    and per-call process CPU time (all threads), which load from other processes inflates less."""
    times, cpu = {k: [] for k in runners}, {k: [] for k in runners}
    while min(len(t) for t in times.values()) < n:
        for k, fn in runners.items():
            for _ in range(min(block, n - len(times[k]))):
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
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
    """Time one case; returns {framework: {step, fwd, bwd (seconds, medians), compile}}."""
    runners = {"jaxlm": JaxRunner(case, total_steps=max(steps * 4, 100))}
    if torch_threads:
        runners["PyTorch"] = TorchRunner(case, torch_threads)
    out = {k: {"compile": r.compile_s} for k, r in runners.items()}
    # Whole steps first (the headline), then forward and forward+backward, each interleaved.
    for what, n in (("step", steps), ("fwd", max(steps // 2, 5)), ("fwd_bwd", max(steps // 2, 5))):
        attr = {"step": "step", "fwd": "forward", "fwd_bwd": "forward_backward"}[what]
        times, cpu = interleaved({k: getattr(r, attr) for k, r in runners.items()}, n, block)
        for k, t in times.items():
            out[k][what] = statistics.median(t)
            out[k][what + "_cpu"] = statistics.median(cpu[k])
    for v in out.values():
        v["bwd"] = v["fwd_bwd"] - v["fwd"]
    return out


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

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads its OpenMP runtime (see docstring)
    import jax

    from train.metrics import measure_cpu_matmul_flops

    torch_note, threads = "", None
    if not args.no_torch:
        try:
            import torch
            threads = usable_cpus()  # XLA's CPU client uses one thread per usable core
            torch_note = f"torch {torch.__version__}, {threads} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
        except ImportError:
            torch_note = "PyTorch baseline skipped: torch is not installed (pip install 'jaxlm[bench]')"
    else:
        torch_note = "PyTorch baseline skipped (--no-torch)"

    device = jax.devices()[0]
    peak = measure_cpu_matmul_flops() if device.platform == "cpu" else float("nan")
    peak_note = f"XLA {peak / 1e9:.1f} GFLOP/s"
    if threads:
        tpeak = torch_matmul_flops()
        peak_note += f", torch {tpeak / 1e9:.1f} GFLOP/s"
        peak = max(peak, tpeak)
    print(f"machine: {machine_line()}")
    print(f"versions: python {platform.python_version()}, jax {jax.__version__}, device {device.device_kind}; {torch_note}")
    print(f"float32 matmul peak (512x512, measured now): {peak_note}; MFU uses the larger")
    print(f"each figure: median over {args.steps} steps (forward, backward: {max(args.steps // 2, 5)}), "
          f"interleaved in blocks of {args.block}\n")

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
