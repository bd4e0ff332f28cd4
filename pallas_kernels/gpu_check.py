"""The one-command GPU check of the Pallas kernels (issue 4), sized for 8 minutes on one H100.

    PYTHONUNBUFFERED=1 python3 -m pallas_kernels.gpu_check --out "${OUT:-gpu_check_out}"

Sections, in order of importance; each is guarded (a failure prints `FAILED <section>: ...` and
the next one runs), each is skipped when the time budget (`--budget-s`) would be exceeded, and
the results JSON is rewritten after every section so a killed run keeps what it measured:

  1. tests     kernel correctness tests on the GPU (pytest: tests/pallas_kernels, GPU cases,
               and tests/model/test_kernel_dispatch.py: model logits and gradients pallas == xla)
  2. logits    gpt2-124m (bf16 and f32, seq 1024) logits with attention=pallas vs xla
  3. headline  seq 4096, head dim 128, bf16, causal, fwd+bwd: pallas vs cudnn vs xla; matmul
               4096x8192x4096 pallas vs jnp.dot
  4. mfu       30 training steps of gpt2-124m (bf16, seq 1024, attention=pallas): MFU
  5. bench     the full table, sequence 1k-16k (python -m pallas_kernels.bench)
  6. sweep     a few flash-attention block sizes at seq 4096 (to retune BlockSizes.default)
  7. mfu_ref   the same 30 steps with attention=cudnn and xla, for comparison

Needs only jax, flax, optax, pyyaml and pytest (no grain: the training steps are driven directly
with synthetic tokens, not through train/loop.py's data pipeline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Targets from issue 4's "Done when".
TARGETS = {"pallas_vs_cudnn_fwd_bwd_4096": 0.8, "pallas_vs_xla_fwd_bwd_4096": 3.0, "matmul_vs_jnp_dot": 0.85,
           "gpt2_124m_mfu": 0.40}
# Written tolerance for gpt2-124m logits, pallas vs xla: max |diff| / std(xla logits).
LOGITS_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


class Check:
    """Runs sections under a time budget and keeps their results (JSON after each one)."""

    def __init__(self, out_dir: Path | None, budget_s: float):
        self.out_dir, self.budget_s, self.t0 = out_dir, budget_s, time.perf_counter()
        self.results: dict = {"sections": {}}
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def section(self, name: str, fn, estimate_s: float):
        left = self.budget_s - self.elapsed()
        if left < estimate_s:
            print(f"\nSKIPPED {name}: {left:.0f} s of the budget left, it needs about {estimate_s:.0f} s", flush=True)
            self.results["sections"][name] = {"status": "skipped", "reason": f"{left:.0f} s left"}
            self.save()
            return None
        print(f"\n=== {name} (t={self.elapsed():.0f} s) ===", flush=True)
        t = time.perf_counter()
        try:
            value = fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001  one failing section must not lose the others
            traceback.print_exc()
            print(f"FAILED {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            value, status = {"error": f"{type(e).__name__}: {e}"[:2000]}, "failed"
        self.results["sections"][name] = {"status": status, "seconds": round(time.perf_counter() - t, 1),
                                          "result": value}
        self.save()
        return value if status == "ok" else None

    def save(self):
        if self.out_dir:
            (self.out_dir / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))


# ---- 1. tests ----------------------------------------------------------------------------------
def run_tests(timeout_s: float) -> dict:
    """pytest on the GPU in a subprocess (before this process takes the GPU's memory)."""
    env = {**os.environ, "JAX_PLATFORMS": "cuda", "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           # the xla side of the comparisons in full float32, as on the CPU (no TF32)
           "JAX_DEFAULT_MATMUL_PRECISION": "highest", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not tpu",
           "tests/pallas_kernels", "tests/model/test_kernel_dispatch.py"]
    print(" ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    tail = (r.stdout + r.stderr)[-6000:]
    print(tail, flush=True)
    summary = next((line for line in reversed(r.stdout.splitlines()) if " passed" in line or " failed" in line
                    or " error" in line), "")
    if r.returncode != 0:
        raise RuntimeError(f"pytest exit code {r.returncode}: {summary}")
    return {"summary": summary}


# ---- 2. logits ---------------------------------------------------------------------------------
def compare_logits(seq: int = 1024, batch: int = 2, model_preset: str = "gpt2-124m", **overrides) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from model import build_model, preset

    out = {}
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, 256, dtype=jnp.int32)
    for dtype in ("bfloat16", "float32"):
        base = preset(model_preset, compute_dtype=dtype, **overrides)
        graphdef, params = nnx.split(build_model(base, seed=0))
        logits = {}
        for impl in ("xla", "pallas"):
            g = nnx.split(build_model(dataclasses.replace(base, attention=impl), seed=0))[0] if impl != "xla" else graphdef
            fwd = jax.jit(lambda p, t, g=g: nnx.merge(g, p)(t)[0])
            logits[impl] = fwd(params, tokens)
        ref, got = logits["xla"], logits["pallas"]
        rel = float(jnp.max(jnp.abs(got - ref)) / jnp.std(ref))
        out[dtype] = {"max_abs_diff": float(jnp.max(jnp.abs(got - ref))), "max_diff_over_std": rel,
                      "tolerance": LOGITS_TOLERANCE[dtype], "pass": rel <= LOGITS_TOLERANCE[dtype]}
        print(f"{dtype}: max|pallas - xla| = {out[dtype]['max_abs_diff']:.3g} ({rel:.3g} x std; tolerance "
              f"{LOGITS_TOLERANCE[dtype]}) -> {'pass' if out[dtype]['pass'] else 'FAIL'}", flush=True)
        del params, logits
    if not all(v["pass"] for v in out.values()):
        raise AssertionError(f"logits differ beyond tolerance: {out}")
    return out


# ---- 3. headline -------------------------------------------------------------------------------
def headline(seq: int = 4096, matmul_shape=(4096, 8192, 4096), **attention_kw) -> dict:
    from pallas_kernels import bench

    rows = bench.bench_attention([seq], ("pallas", "cudnn", "xla"), log=lambda s: print(s, flush=True),
                                 **attention_kw)
    by = {r["impl"]: r for r in rows}
    ratios = {}
    for base, key in (("cudnn", "pallas_vs_cudnn_fwd_bwd_4096"), ("xla", "pallas_vs_xla_fwd_bwd_4096")):
        if "error" not in by["pallas"] and "error" not in by[base]:
            ratios[key] = by["pallas"]["fwd_bwd_tflops"] / by[base]["fwd_bwd_tflops"]
    mm = bench.bench_matmul(*matmul_shape)
    print(bench.format_report([], mm), flush=True)
    ok = [r for r in mm if "error" not in r]
    if len(ok) == 2:
        ratios["matmul_vs_jnp_dot"] = ok[0]["tflops"] / ok[1]["tflops"]
    return {"attention": rows, "matmul": mm, "ratios": ratios}


# ---- 4. / 7. training MFU ----------------------------------------------------------------------
def train_mfu(attention: str = "pallas", steps: int = 30, batch: int = 16, seq: int = 1024,
              model_preset: str = "gpt2-124m", **overrides) -> dict:
    """`steps` optimizer steps of gpt2-124m (bf16 compute, f32 params, AdamW) on synthetic tokens,
    through train.step's jitted step; MFU from the median step time after the first two."""
    import jax
    import jax.numpy as jnp

    from model import build_model, preset
    from train.config import OptimConfig
    from train.metrics import peak_flops
    from train.optim import learning_rate_schedule, make_optimizer
    from train.step import init_train_state, make_train_step

    cfg = preset(model_preset, compute_dtype="bfloat16", attention=attention, max_seq_len=seq, **overrides)
    optim = OptimConfig()
    tx = make_optimizer(optim, steps)
    graphdef, state = init_train_state(build_model(cfg, seed=0), tx, seed=0)
    step_fn = make_train_step(graphdef, tx, learning_rate_schedule(optim, steps))
    key = jax.random.key(0)
    times, losses = [], []
    for i in range(steps):
        toks = jax.random.randint(jax.random.fold_in(key, i), (batch, seq + 1), 0, cfg.vocab_size, dtype=jnp.int32)
        batch_ = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
        t = time.perf_counter()
        state, metrics = step_fn(state, batch_)
        losses.append(float(metrics["loss"]))  # blocks until the step is done
        times.append(time.perf_counter() - t)
    median = statistics.median(times[2:])
    peak, source = peak_flops()
    tokens_per_s = batch * seq / median
    mfu = cfg.flops_per_token(seq) * tokens_per_s / peak
    result = {"attention": attention, "batch": batch, "seq": seq, "steps": steps, "first_step_s": times[0],
              "median_step_s": median, "tokens_per_s": tokens_per_s, "mfu": mfu, "peak_flops": peak,
              "peak_source": source, "loss_first": losses[0], "loss_last": losses[-1]}
    print(f"{model_preset} attention={attention}: median step {median * 1e3:.1f} ms, {tokens_per_s:,.0f} tokens/s, "
          f"MFU {mfu:.1%} (peak {peak:.3g}: {source}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"compile+first step {times[0]:.1f} s", flush=True)
    return result


def reference_mfu(**kw) -> dict:
    """train_mfu with attention=cudnn and =xla; one failing does not lose the other."""
    out = {}
    for attention in ("cudnn", "xla"):
        try:
            out[attention] = train_mfu(attention, **kw)
        except Exception as e:  # noqa: BLE001
            out[attention] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            print(f"attention={attention}: FAILED {out[attention]['error']}", flush=True)
    return out


# ---- 6. block-size sweep -----------------------------------------------------------------------
SWEEP = {
    "fwd128x64_dkv64x128_dq128x64": dict(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128, block_q_dq=128,
                                         block_k_dq=64),
    "fwd128x128_dkv64x64_dq64x64": dict(block_q=128, block_k=128, block_q_dkv=64, block_k_dkv=64, block_q_dq=64,
                                        block_k_dq=64),
    "fwd64x64_dkv32x128_dq128x32_w4": dict(block_q=64, block_k=64, block_q_dkv=32, block_k_dkv=128, block_q_dq=128,
                                           block_k_dq=32, num_warps=4, num_warps_bwd=4),
    "fwd128x64_s4_dkv128x128_dq128x128_w8": dict(block_q=128, block_k=64, num_stages=4, block_q_dkv=128,
                                                 block_k_dkv=128, block_q_dq=128, block_k_dq=128, num_warps_bwd=8),
}


def sweep_blocks(seq: int = 4096, **attention_kw) -> dict:
    from pallas_kernels import bench
    from pallas_kernels.flash_attention import BlockSizes

    out = {}
    for name, kw in SWEEP.items():
        try:
            r = bench.bench_attention_one("pallas", seq, block_sizes=BlockSizes(**kw), iters=5, **attention_kw)
            out[name] = {"fwd_tflops": r["fwd_tflops"], "fwd_bwd_tflops": r["fwd_bwd_tflops"]}
            print(f"{name}: fwd {r['fwd_tflops']:.1f} TF/s, fwd+bwd {r['fwd_bwd_tflops']:.1f} TF/s", flush=True)
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            print(f"{name}: FAILED {out[name]['error']}", flush=True)
    return out


def summary_table(results: dict) -> str:
    s = results["sections"]
    lines = ["", "=" * 72, "SUMMARY" + (" (--smoke: tiny sizes, the figures below are no measurements)"
                                        if results.get("smoke") else ""),
             f"{'section':<10} {'status':<8} {'seconds':>7}  result"]
    for name, r in s.items():
        res = r.get("result") or {}
        brief = ""
        if name == "tests":
            brief = res.get("summary", "") if isinstance(res, dict) else ""
        elif name == "logits" and isinstance(res, dict):
            brief = ", ".join(f"{k}: {v['max_diff_over_std']:.2g} x std" for k, v in res.items() if isinstance(v, dict)
                              and "max_diff_over_std" in v)
        elif name in ("mfu", "mfu_ref") and isinstance(res, dict):
            brief = ", ".join(f"{v['attention']}: MFU {v['mfu']:.1%}" for v in ([res] if "mfu" in res else res.values())
                              if isinstance(v, dict) and "mfu" in v)
        if isinstance(res, dict) and "error" in res:
            brief = res["error"].splitlines()[0][:100]
        lines.append(f"{name:<10} {r['status']:<8} {r.get('seconds', 0):>7}  {brief}")
    figures = dict((s.get("headline", {}).get("result") or {}).get("ratios", {}))
    mfu = (s.get("mfu", {}).get("result") or {}).get("mfu")
    if mfu is not None:
        figures["gpt2_124m_mfu"] = mfu
    lines += ["", f"{'figure':<32} {'measured':>9} {'target':>7}  verdict"]
    for key, target in TARGETS.items():
        v = figures.get(key)
        verdict = "not measured" if v is None else ("MET" if v >= target else "NOT MET")
        lines.append(f"{key:<32} {'-' if v is None else f'{v:.3f}':>9} {target:>7}  {verdict}")
    results["figures"] = figures
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pallas_kernels.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.json (default $OUT)")
    p.add_argument("--budget-s", type=float, default=420, help="start no section that would end past this (default 420)")
    p.add_argument("--batch", type=int, default=32, help="gpt2-124m batch for the MFU steps (default 32)")
    p.add_argument("--skip", default="", help="comma-separated sections to skip")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, to dry-run every section on a CPU (kernels interpreted; no figures)")
    args = p.parse_args(argv)
    if args.smoke:
        tiny_model = dict(model_preset="gpt2-nano", vocab_size=256, n_layers=2, d_model=64, n_heads=2)
        tiny_att = dict(tokens=256, heads=2, head_dim=64, iters=1)
        sizes = dict(logits=dict(seq=64, **tiny_model), headline=dict(seq=128, matmul_shape=(64, 128, 64), **tiny_att),
                     mfu=dict(steps=4, batch=2, seq=64, **tiny_model), bench=dict(seqs=[64], **tiny_att),
                     sweep=dict(seq=128, tokens=128, heads=1, head_dim=64))
    else:
        sizes = dict(logits={}, headline={}, mfu=dict(batch=args.batch), bench=dict(seqs=[1024, 2048, 8192, 16384]),
                     sweep={})
    check = Check(Path(args.out) if args.out else None, args.budget_s)
    check.results["smoke"] = args.smoke
    skip = set(filter(None, args.skip.split(",")))
    run = lambda name, fn, est: None if name in skip else check.section(name, fn, est)  # noqa: E731

    run("tests", lambda: run_tests(timeout_s=150), 60)  # first: before this process holds the GPU
    import jax
    import jaxlib

    check.results["device"] = f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
    check.results["versions"] = f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}"
    print(f"device: {check.results['device']}; {check.results['versions']}", flush=True)
    from pallas_kernels import bench

    run("logits", lambda: compare_logits(**sizes["logits"]), 40)
    run("headline", lambda: headline(**sizes["headline"]), 60)
    run("mfu", lambda: train_mfu("pallas", **sizes["mfu"]), 60)
    run("bench", lambda: bench.bench_attention(log=lambda s: print(s, flush=True), **sizes["bench"]), 90)
    run("sweep", lambda: sweep_blocks(**sizes["sweep"]), 50)
    run("mfu_ref", lambda: reference_mfu(**sizes["mfu"]), 80)
    sections = check.results["sections"]
    attention_rows = [r for name in ("headline", "bench") for r in (
        ((sections.get(name) or {}).get("result") or {}).get("attention", []) if name == "headline"
        else ((sections.get(name) or {}).get("result") or []))]
    matmul_rows = ((sections.get("headline") or {}).get("result") or {}).get("matmul", [])
    if attention_rows or matmul_rows:
        print("\n" + bench.format_report(sorted(attention_rows, key=lambda r: r["seq"]), matmul_rows), flush=True)
    table = summary_table(check.results)
    check.save()
    print(table, flush=True)
    print(f"\ntotal {check.elapsed():.0f} s; results in {args.out or '(no --out)'}/gpu_check.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
