"""`python -m infer.bench`: the inference engine against baselines measured in the same run.

    python -m infer.bench --run runs/shakespeare_char_cpu [--draft runs/DRAFT] [--new-tokens 500] [--repeats 5]

Without --run a random gpt2-nano (vocab 65, 64 positions) stands in. Tables (medians of --repeats
runs; the compared variants are timed interleaved, one after the other in each repeat, after a
warm-up call that compiles):

1. tokens/s at batch 1, 8, 32, greedy, --new-tokens new tokens from a short prompt:
   the jitted KV-cache loop (`generate_long`: prefill, one compiled while_loop, the window slides
   inside it past the context) vs nanoGPT's way: for every new token, a jitted full forward pass
   over the last <= max_seq_len tokens (one compile: a fixed max_seq_len buffer) and argmax.
2. int8 weights vs float32: tokens/s at batch 1, weight bytes, and top-1 next-token agreement of
   the two on the validation split of the run's text (every position of consecutive windows).
3. speculative vs plain greedy decoding at batch 1 (with --draft; within the context).
4. time per token at position p: t(p) = (T(p + w) - T(p)) / w, where T(n) is the median wall time
   of one batch-1 greedy generate_long call producing n new tokens from a 1-token prompt and
   w = 64; "position p" is the index of the generated token in the output stream (past the
   context the model sees it at a position inside its sliding window).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.quantize import dequantize_params, quantize_params, weight_bytes
from infer.sampler import Sampler


@functools.partial(jax.jit, static_argnames="graphdef")
def _recompute_step(graphdef, params, ctx, last):
    """ctx (B, S) right-padded, last: () index of the last real token -> (B,) greedy next tokens."""
    logits, _ = nnx.merge(graphdef, params)(ctx)
    return jnp.argmax(logits[:, last], axis=-1).astype(jnp.int32)


def recompute_generate(model, prompts: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """nanoGPT's generate (greedy): a full forward over the last <= max_seq_len tokens for every token."""
    S = model.cfg.max_seq_len
    graphdef, params = nnx.split(model)
    step = functools.partial(_recompute_step, graphdef)  # one compile per architecture (jax.jit's cache)
    B, L = prompts.shape
    seq = np.zeros((B, L + max_new_tokens), np.int32)
    seq[:, :L] = prompts
    for n in range(L, L + max_new_tokens):
        lo = max(0, n - S)
        ctx = np.zeros((B, S), np.int32)
        ctx[:, :n - lo] = seq[:, lo:n]
        seq[:, n] = np.asarray(step(params, ctx, n - lo - 1))
    return seq[:, L:]


def timed(fn) -> float:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per variant; each variant runs once per repeat, in turn (after one warm-up)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")


def agreement(model, val_ids: np.ndarray, batch: int = 64) -> tuple[float, int]:
    """Top-1 next-token agreement of float32 and int8 weights over consecutive max_seq_len windows."""
    S = model.cfg.max_seq_len
    n = len(val_ids) // S
    windows = val_ids[:n * S].reshape(n, S).astype(np.int32)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    q = quantize_params(params)
    f = jax.jit(lambda p, t: jnp.argmax(nnx.merge(graphdef, dequantize_params(p))(t)[0], axis=-1))
    same = total = 0
    for i in range(0, n, batch):
        t = windows[i:i + batch]
        same += int(np.sum(np.asarray(f(params, t)) == np.asarray(f(q, t))))
        total += t.size
    return same / total, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.bench", description="KV-cache loop vs recompute, int8, "
                                "speculative decoding, time per token by position.")
    p.add_argument("--run", default=None, help="run directory (default: a random gpt2-nano)")
    p.add_argument("--draft", default=None, help="run directory of a draft model for speculative decoding")
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--k", type=int, default=4, help="draft tokens per speculative round")
    args = p.parse_args(argv)
    from sharding.host_memory import keep_freed_host_memory_or_exit

    keep_freed_host_memory_or_exit("python -m infer.bench")  # before JAX's first computation

    if args.run:
        from model.checkpoint import load_for_inference

        config, model, tokenizer, _ = load_for_inference(args.run)
        prompt = [int(i) for i in tokenizer.encode("ROMEO:")] if tokenizer.kind == "char" else [0]
        val_ids = None
        data = config.get("data", {})
        if data.get("path") and os.path.isfile(data["path"]):
            ids = tokenizer.encode(open(data["path"]).read())
            val_ids = np.asarray(ids[int(len(ids) * (1 - data.get("val_fraction", 0.1))):])
        name = args.run
    else:
        from model import build_model, preset

        model = build_model(preset("gpt2-nano", vocab_size=65), seed=0)
        prompt, val_ids, name = [1], None, "random gpt2-nano"
    S = model.cfg.max_seq_len
    N, R = args.new_tokens, args.repeats
    print(f"# infer.bench: {name}, {model.cfg.num_params():,} parameters, max_seq_len {S}")
    print(f"# device {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"{os.cpu_count()} CPU cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at start")
    import flax

    print(f"# python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
          f"{platform.machine()} {platform.system()}; medians of {R} interleaved repeats")

    sampler = Sampler(model)

    # 1. KV-cache loop vs recompute.
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [prompt] * B
        arr = np.asarray(prompts, np.int32)
        kv = lambda: sampler.generate(prompts, max_new_tokens=N, temperature=0, slide=True)  # noqa: E731
        rc = lambda: recompute_generate(model, arr, N)  # noqa: E731
        # Until the first slide both condition on the whole sequence; after it the KV loop sees a
        # window of S/2..S-1 tokens and the baseline the last S tokens, so tokens may differ by design.
        fit = S - len(prompt)
        same = kv()[0][:fit] == rc()[0].tolist()[:fit]
        t = interleaved({"kv": kv, "recompute": rc}, R)
        rows.append([B, N, f"{B * N / t['kv']:,.0f}", f"{B * N / t['recompute']:,.0f}",
                     f"{t['recompute'] / t['kv']:.1f}x", "yes" if same else "no"])
    table("## KV-cache loop vs recompute baseline (greedy tokens/s)",
          ["batch", "new tokens", "KV-cache loop", "recompute (nanoGPT)", "speed-up", "same tokens within the context"], rows)

    # 2. int8 vs float.
    q_sampler = Sampler(model, quantize="int8")
    t = interleaved({"float": lambda: sampler.generate([prompt], max_new_tokens=N, temperature=0, slide=True),
                     "int8": lambda: q_sampler.generate([prompt], max_new_tokens=N, temperature=0, slide=True)}, R)
    fb, qb = weight_bytes(sampler.params), weight_bytes(q_sampler.params)
    agree = "n/a (no validation text)"
    if val_ids is not None:
        a, n = agreement(model, val_ids)
        agree = f"{100 * a:.2f}% of {n:,} positions"
    table("## int8 weight-only vs float32 (batch 1)", ["weights", "tokens/s", "weight bytes", "top-1 agreement"],
          [["float32", f"{N / t['float']:,.0f}", f"{fb:,}", "-"],
           ["int8", f"{N / t['int8']:,.0f}", f"{qb:,} ({100 * qb / fb:.1f}%)", agree]])

    # 3. speculative vs plain.
    if args.draft:
        from infer.speculative import speculative_generate
        from model.checkpoint import load_for_inference

        _, draft, _, _ = load_for_inference(args.draft)
        n_spec = S - len(prompt) - args.k - 1
        plain = lambda: sampler.generate([prompt], max_new_tokens=n_spec, temperature=0)  # noqa: E731
        spec = lambda: speculative_generate(model, draft, prompt, max_new_tokens=n_spec, k=args.k)  # noqa: E731
        out, stats = spec()
        same = out == plain()[0]
        t = interleaved({"plain": plain, "spec": spec}, R)
        table(f"## speculative (draft {args.draft}, {draft.cfg.num_params():,} parameters, k={args.k}) vs plain "
              "greedy, batch 1",
              ["new tokens", "plain tokens/s", "speculative tokens/s", "speed-up", "acceptance", "same tokens"],
              [[n_spec, f"{n_spec / t['plain']:,.0f}", f"{n_spec / t['spec']:,.0f}", f"{t['plain'] / t['spec']:.2f}x",
                f"{100 * stats['acceptance']:.0f}%", "yes" if same else "no"]])

    # 4. time per token by position.
    w = 64
    points = [16, 512]
    lengths = sorted({n for p_ in points for n in (p_, p_ + w)})
    fns = {n: (lambda n=n: sampler.generate([prompt], max_new_tokens=n, temperature=0, slide=True)) for n in lengths}
    t = interleaved(fns, R)
    per = {p_: (t[p_ + w] - t[p_]) / w for p_ in points}
    table(f"## time per token at position p = (T(p+{w}) - T(p)) / {w}, batch 1",
          ["position p", "ms per token", f"ratio to p={points[0]}"],
          [[p_, f"{1e3 * per[p_]:.3f}", f"{per[p_] / per[points[0]]:.2f}"] for p_ in points])
    print(f"\n# load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
