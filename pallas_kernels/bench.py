"""Benchmark the Pallas kernels against their baselines, measured in the same run.

    python -m pallas_kernels.bench                        # attention 1k-16k + matmul, bf16, causal, Dh 128
    python -m pallas_kernels.bench --seqs 4096 --no-matmul
    python -m pallas_kernels.bench --json results.json

Attention: per sequence length, forward and forward+backward time and TFLOP/s of pallas flash
attention vs xla (the model's plain-jnp attention) vs cudnn (jax.nn.dot_product_attention),
with batch * sequence fixed (16k tokens by default) and the pallas/baseline ratios. Matmul:
pallas vs jnp.dot at M x K x N = 4096 x 8192 x 4096. FLOPs: attention forward 4*B*H*L*S*Dh
(halved when causal), backward 2.5x forward (FlashAttention-2's count); matmul 2*M*N*K.
On a CPU the kernels run interpreted (not a performance figure): use tiny sizes there.
"""

from __future__ import annotations

import argparse
import json
import math
import platform as host_platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("pallas", "xla", "cudnn")


def device_description() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform}, {jax.device_count()} device(s))"


def versions() -> str:
    import jaxlib

    return f"python {host_platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}"


def time_fn(fn, *args, iters: int = 10, repeats: int = 3) -> tuple[float, float]:
    """(compile + first call seconds, median seconds per call over `repeats` runs of `iters` calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return first, statistics.median(times)


def attention_fn(impl: str, causal: bool, block_sizes=None):
    """(q, k, v) -> (B, L, H, Dh) for one implementation."""
    if impl == "pallas":
        from pallas_kernels.flash_attention import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=block_sizes)
    if impl == "xla":
        from model.attention import xla_attention

        def xla(q, k, v):
            L, S = q.shape[1], k.shape[1]
            mask = jnp.tril(jnp.ones((L, S), bool)) if causal else jnp.ones((L, S), bool)
            return xla_attention(q, k, v, jnp.broadcast_to(mask, (q.shape[0], L, S)))
        return xla
    if impl == "cudnn":
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")
    raise ValueError(f"attention impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")


def attention_flops(B, L, H, Dh, causal: bool) -> float:
    return 4.0 * B * H * L * L * Dh * (0.5 if causal else 1.0)


def bench_attention_one(impl: str, L: int, *, tokens: int = 16384, heads: int = 16, head_dim: int = 128,
                        dtype=jnp.bfloat16, causal: bool = True, block_sizes=None, iters: int = 10) -> dict:
    """Forward and forward+backward of one implementation at one sequence length."""
    B = max(1, tokens // L)
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    shape = (B, L, heads, head_dim)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in (kq, kk, kv, kg))
    f = attention_fn(impl, causal, block_sizes)
    fwd = jax.jit(f)

    def loss(q, k, v):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * g.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    flops = attention_flops(B, L, heads, head_dim, causal)
    row = dict(impl=impl, seq=L, batch=B, heads=heads, head_dim=head_dim, dtype=jnp.dtype(dtype).name,
               causal=causal)
    compile_f, t_f = time_fn(fwd, q, k, v, iters=iters)
    compile_fb, t_fb = time_fn(fwd_bwd, q, k, v, iters=iters)
    row.update(fwd_ms=t_f * 1e3, fwd_tflops=flops / t_f / 1e12, fwd_bwd_ms=t_fb * 1e3,
               fwd_bwd_tflops=3.5 * flops / t_fb / 1e12, compile_s=compile_f + compile_fb)
    return row


def bench_attention(seqs, impls=ATTENTION_IMPLS, xla_max_seq: int = 8192, log=print, **kw) -> list[dict]:
    """Rows for every (seq, impl); a failing cell (e.g. cuDNN missing) is a row with `error`."""
    rows = []
    for L in seqs:
        for impl in impls:
            if impl == "xla" and L > xla_max_seq:
                rows.append(dict(impl=impl, seq=L, error=f"skipped: xla materializes the L x L scores "
                                                         f"(> --xla-max-seq {xla_max_seq})"))
                continue
            try:
                rows.append(bench_attention_one(impl, L, **kw))
            except Exception as e:  # noqa: BLE001  one failing baseline must not lose the others
                rows.append(dict(impl=impl, seq=L, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            log(format_attention_rows(rows[-1:], header=False))
    return rows


def bench_matmul(m: int = 4096, k: int = 8192, n: int = 4096, dtype=jnp.bfloat16, block_sizes=None,
                 iters: int = 20) -> list[dict]:
    """pallas matmul vs jnp.dot at (m, k) @ (k, n)."""
    from pallas_kernels.matmul import matmul

    a = jax.random.normal(jax.random.key(1), (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(2), (k, n), jnp.float32).astype(dtype)
    rows = []
    for impl, f in (("pallas", lambda a, b: matmul(a, b, block_sizes=block_sizes)),
                    ("jnp.dot", lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))):
        try:
            compile_s, t = time_fn(jax.jit(f), a, b, iters=iters)
            rows.append(dict(impl=impl, m=m, k=k, n=n, dtype=jnp.dtype(dtype).name, ms=t * 1e3,
                             tflops=2.0 * m * n * k / t / 1e12, compile_s=compile_s))
        except Exception as e:  # noqa: BLE001
            rows.append(dict(impl=impl, m=m, k=k, n=n, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
    return rows


def _ratio(a, b):
    return a / b if (a and b and math.isfinite(a) and math.isfinite(b)) else float("nan")


def attention_ratios(rows) -> list[dict]:
    """pallas / baseline TFLOP/s per sequence length (forward and forward+backward)."""
    by = {(r["seq"], r["impl"]): r for r in rows if "error" not in r}
    out = []
    for L in sorted({r["seq"] for r in rows}):
        p = by.get((L, "pallas"))
        for base in ("xla", "cudnn"):
            b = by.get((L, base))
            if p and b:
                out.append(dict(seq=L, baseline=base, fwd=_ratio(p["fwd_tflops"], b["fwd_tflops"]),
                                fwd_bwd=_ratio(p["fwd_bwd_tflops"], b["fwd_bwd_tflops"])))
    return out


def format_attention_rows(rows, header: bool = True) -> str:
    lines = []
    if header:
        lines.append(f"{'seq':>6} {'impl':>7} {'batch':>5} {'fwd ms':>9} {'fwd TF/s':>9} {'f+b ms':>9} "
                     f"{'f+b TF/s':>9} {'compile s':>9}")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['seq']:>6} {r['impl']:>7}  {r['error']}")
        else:
            lines.append(f"{r['seq']:>6} {r['impl']:>7} {r['batch']:>5} {r['fwd_ms']:>9.3f} {r['fwd_tflops']:>9.1f} "
                         f"{r['fwd_bwd_ms']:>9.3f} {r['fwd_bwd_tflops']:>9.1f} {r['compile_s']:>9.1f}")
    return "\n".join(lines)


def format_report(attention_rows, matmul_rows) -> str:
    out = [f"device: {device_description()}", f"versions: {versions()}"]
    if attention_rows:
        r0 = next((r for r in attention_rows if "error" not in r), {})
        out += ["", f"attention ({r0.get('dtype', '?')}, heads {r0.get('heads', '?')}, head dim "
                    f"{r0.get('head_dim', '?')}, causal {r0.get('causal', '?')}; TF/s by FlashAttention-2's count)",
                format_attention_rows(attention_rows), "", "pallas / baseline (TFLOP/s ratio)",
                f"{'seq':>6} {'baseline':>8} {'fwd':>7} {'fwd+bwd':>8}"]
        out += [f"{r['seq']:>6} {r['baseline']:>8} {r['fwd']:>7.2f} {r['fwd_bwd']:>8.2f}"
                for r in attention_ratios(attention_rows)]
    if matmul_rows:
        out += ["", "matmul"]
        for r in matmul_rows:
            if "error" in r:
                out.append(f"{r['impl']:>8}  {r['error']}")
            else:
                out.append(f"{r['impl']:>8} {r['m']}x{r['k']}x{r['n']} {r['dtype']}: {r['ms']:.3f} ms, "
                           f"{r['tflops']:.1f} TFLOP/s")
        ok = [r for r in matmul_rows if "error" not in r]
        if len(ok) == 2:
            out.append(f"pallas / jnp.dot: {_ratio(ok[0]['tflops'], ok[1]['tflops']):.2f}")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pallas_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--tokens", type=int, default=16384, help="batch * sequence per call (default 16384)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--impls", default=",".join(ATTENTION_IMPLS), help="subset of pallas,xla,cudnn")
    p.add_argument("--xla-max-seq", type=int, default=8192, help="skip xla above this length (its L x L scores)")
    p.add_argument("--no-attention", action="store_true")
    p.add_argument("--no-matmul", action="store_true")
    p.add_argument("--matmul-shape", default="4096,8192,4096", help="M,K,N")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    try:
        seqs = [int(s) for s in args.seqs.split(",") if s]
        m, k, n = (int(s) for s in args.matmul_shape.split(","))
    except ValueError:
        p.error(f"--seqs={args.seqs!r} / --matmul-shape={args.matmul_shape!r} must be comma-separated integers")
    impls = tuple(i for i in args.impls.split(",") if i)
    bad = [i for i in impls if i not in ATTENTION_IMPLS]
    if bad:
        p.error(f"--impls: {', '.join(bad)} not among {', '.join(ATTENTION_IMPLS)}")
    dtype = jnp.dtype(args.dtype)
    print(f"device: {device_description()}\nversions: {versions()}", flush=True)
    att = [] if args.no_attention else bench_attention(
        seqs, impls, xla_max_seq=args.xla_max_seq, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim,
        dtype=dtype, causal=not args.non_causal, log=lambda s: print(s, flush=True))
    mm = [] if args.no_matmul else bench_matmul(m, k, n, dtype=dtype)
    print("\n" + format_report(att, mm))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_description(), versions=versions(), attention=att, matmul=mm), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
