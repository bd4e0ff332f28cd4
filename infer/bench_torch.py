"""Decoding-speed benchmark: jaxlm's sampler (the decode loop of `python -m infer sample`) against
the same model decoding with a KV cache in eager PyTorch.

    python -m infer.bench_torch                    # shakespeare_char_cpu model, batch 1, 8-token prompt
    python -m infer.bench_torch --batch 4 --rounds 20

Both decode greedily with the same weights (copied from the jaxlm model into the PyTorch one), so
they compute the same tokens; the table gives the median wall time of one whole generate call
(prefill + decode) and new tokens per second, timed in interleaved rounds so that load from
other processes hits both alike. jaxlm's first call (compile) is reported apart. As in
train.bench, jaxlm runs in this process and PyTorch in a spawned worker process of its own (same
thread count, torch's default OpenMP wait policy unless OMP_WAIT_POLICY is set: see
train/bench.py), so neither framework's threads slow the other: in one process the two disturbed
each other by up to 3x from run to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time

from train.bench import (RECIPES, TorchWorker, interleaved, load_case, machine_line, timed_calls, torch_worker_note,
                         usable_cpus)


class TorchDecodeRunner:
    """Built inside the PyTorch worker process: the baseline model with jaxlm's weights
    (`params`: the pure dict as numpy arrays) decoding `prompts` greedily with its KV cache."""

    def __init__(self, cfg, params, prompts, n_new: int, threads: int):
        import torch

        from train import torch_baseline

        torch.set_num_threads(threads)
        self.tb, self.n_new = torch_baseline, n_new
        self.model = torch_baseline.load_jaxlm_params(torch_baseline.TorchGPT(cfg), params)
        self.prompt = torch.from_numpy(prompts)

    def generate(self):
        return self.tb.generate_greedy(self.model, self.prompt, self.n_new)

    def tokens(self) -> list[list[int]]:
        return self.generate().tolist()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.bench_torch", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="small", help=f"comma-separated: {', '.join(RECIPES)} (default small)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default 8)")
    parser.add_argument("--new-tokens", type=int, default=0,
                        help="tokens to generate (default: fill the model's context)")
    parser.add_argument("--rounds", type=int, default=20, help="timed generate calls per framework (default 20)")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if not keys or any(k not in RECIPES for k in keys):
        parser.exit(2, f"python -m infer.bench_torch: error: --models {args.models!r}: choose from {', '.join(RECIPES)}\n")
    if min(args.batch, args.prompt_len, args.rounds) < 1 or args.new_tokens < 0:
        parser.exit(2, "python -m infer.bench_torch: error: --batch, --prompt-len, --rounds must be >= 1, --new-tokens >= 0\n")

    import importlib.util

    from sharding.host_memory import keep_freed_host_memory_or_exit

    host_memory = keep_freed_host_memory_or_exit("python -m infer.bench_torch")  # before JAX's first computation
    import jax
    import numpy as np
    from flax import nnx

    from infer.sampler import Sampler
    from model.transformer import build_model

    threads = usable_cpus()
    if importlib.util.find_spec("torch") is None:
        torch_note = "PyTorch baseline skipped: torch is not installed (pip install 'jaxlm[bench]')"
        threads = 0
    else:
        torch_note = torch_worker_note(threads)

    print(f"machine: {machine_line()}")
    print(f"versions: python {platform.python_version()}, jax {jax.__version__}, device {jax.devices()[0].device_kind}; {torch_note}")
    print(f"jaxlm keeps freed host memory (sharding/host_memory.py): {host_memory}")
    print(f"greedy decoding, median over {args.rounds} interleaved generate calls, each framework in its own process\n")
    print("| model | batch | prompt + new | framework | generate ms | new tokens/s | compile s | CPU ms "
          "| PyTorch/jaxlm time | same tokens |")
    print("|" + " --- |" * 10)
    for key in keys:
        # the recipe's model with the sampler's attention (the KV-cache path is jnp attention only)
        cfg = dataclasses.replace(load_case(key).model, attention="xla")
        n_new = args.new_tokens or cfg.max_seq_len - args.prompt_len
        if args.prompt_len + n_new > cfg.max_seq_len:
            parser.exit(2, f"python -m infer.bench_torch: error: --prompt-len + --new-tokens = {args.prompt_len + n_new} "
                           f"exceeds the {key} model's context of {cfg.max_seq_len}\n")
        model = build_model(cfg, seed=0)
        prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len))
        sampler = Sampler(model)

        def run_jax():
            return sampler.generate(list(prompts), max_new_tokens=n_new, temperature=0.0)

        t0 = time.perf_counter()
        jax_tokens = run_jax()
        compile_s = time.perf_counter() - t0
        runners = {"jaxlm": lambda m: timed_calls(run_jax, m)}
        same, worker = "", None
        if threads:
            params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
            worker = TorchWorker(TorchDecodeRunner, cfg, params, prompts, n_new, threads)
            agree = np.mean(np.asarray(worker.call("tokens")) == np.asarray(jax_tokens))
            same = f"{agree:.0%}"
            runners["PyTorch"] = lambda m: worker.timed("generate", m)
        try:
            times, cpu = interleaved(runners, args.rounds, block=1)
        finally:
            if worker:
                worker.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, m in med.items():
            ratio = f"{med['PyTorch'] / med['jaxlm']:.2f}x" if k == "jaxlm" and "PyTorch" in med else ""
            print(f"| {key} | {args.batch} | {args.prompt_len} + {n_new} | {k} | {m * 1e3:.1f} | "
                  f"{args.batch * n_new / m:,.0f} | {f'{compile_s:.1f}' if k == 'jaxlm' else 'eager'} | "
                  f"{statistics.median(cpu[k]) * 1e3:.1f} | {ratio} | {same if k == 'jaxlm' else ''} |", flush=True)
    print(f"\nload average after: {' / '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
