"""keep_freed_host_memory: XLA:CPU's per-call temporaries stop page-faulting once it is on."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from sharding import host_memory

ROOT = Path(__file__).resolve().parents[2]

# A jitted function whose temporaries (~100 MB, two 48 MB intermediates live at once) are allocated
# on every call, as a train step's are; it reports the minor page faults per call after warm-up.
PROBE = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from sharding.host_memory import keep_freed_host_memory
status = keep_freed_host_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    a = jnp.sin(x) * 2.0          # (3072, 4096) float32 = 48 MB each
    b = jnp.cos(x) + a[::-1]
    return (a * b).sum(axis=0)

x = jnp.ones((3072, 4096), jnp.float32)
faults = []
for _ in range(40):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"status": status, "faults": faults}))
"""


def probe(setting: str) -> dict:
    env = {**os.environ, host_memory.ENV: setting, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one device: the probe measures the allocator, not the mesh
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt is glibc's; elsewhere the setting does nothing")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    off, on = probe("0"), probe("1")
    assert off["status"] == "off (JAXLM_KEEP_HOST_MEMORY=0)"
    assert on["status"].startswith("on (glibc ")
    # glibc's defaults: the 48 MB temporaries are fresh mmaps each call, 4 KiB pages zero-filled on
    # first touch: ~12,000 faults per 48 MB, every call.
    assert min(off["faults"][10:]) > 5000, off
    # Kept: calls reuse memory earlier calls freed and do not fault. The heap still grows now and
    # then (a 144 MB step here: blocks freed by XLA's threads in a different order leave holes too
    # small), mostly over the first ~16 calls, rarely later (5 of calls 20-40 in one run of five;
    # over 300 calls resident memory settled at 1.27 GB), so the median call is the claim.
    assert statistics.median(on["faults"][10:]) < 100, on


def test_left_alone_when_jax_runs_on_an_accelerator(monkeypatch):
    monkeypatch.setattr(host_memory, "_status", None)
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert host_memory.keep_freed_host_memory().startswith("not needed (JAX_PLATFORMS=tpu,cpu")


def test_bad_setting_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(host_memory, "_status", None)
    monkeypatch.setenv(host_memory.ENV, "maybe")
    with pytest.raises(host_memory.HostMemorySettingError, match="JAXLM_KEEP_HOST_MEMORY='maybe': use 1"):
        host_memory.keep_freed_host_memory()


def test_train_command_reports_a_bad_setting_without_a_traceback():
    env = {**os.environ, host_memory.ENV: "maybe"}
    out = subprocess.run([sys.executable, "-m", "train", "experiments/quickstart.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "JAXLM_KEEP_HOST_MEMORY='maybe'" in out.stderr and "Traceback" not in out.stderr


def test_benchmark_reports_a_bad_setting_in_one_line():
    env = {**os.environ, host_memory.ENV: "maybe"}
    out = subprocess.run([sys.executable, "-m", "train.bench", "--no-torch"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("python -m train.bench: error: JAXLM_KEEP_HOST_MEMORY='maybe': use 1 (keep freed "
                                  "host memory, the default) or 0 (glibc's defaults)")


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallinfo2/malloc_trim are glibc's")
def test_heap_watch_gives_back_the_holes_when_the_heap_grows():
    """With the policy on, a freed 64 MB block stays resident in the heap; HeapWatch trims it away
    on its first call and again after the heap grew, and leaves a steady heap alone."""
    script = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from sharding.host_memory import HeapWatch, keep_freed_host_memory
from train.timeline import rss_bytes
keep_freed_host_memory()
libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
watch = HeapWatch()
keep = libc.malloc(1 << 20)                      # something live below the big block
big = libc.malloc(64 << 20); ctypes.memset(big, 1, 64 << 20)
guard = libc.malloc(1 << 20)                     # live above it: the freed block is a hole, not the top
libc.free(big)
before = rss_bytes()
first = watch()                                  # first call: trims
after = rss_bytes()
steady = watch()                                 # nothing grew: no trim
big2 = libc.malloc(128 << 20); ctypes.memset(big2, 1, 128 << 20); libc.free(big2)  # the heap grows
grown = watch()
print(json.dumps({"first": first, "steady": steady, "grown": grown, "released_mb": (before - after) / 2**20,
                  "trims": watch.trims}))
"""
    env = {**os.environ, host_memory.ENV: "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["first"] and not r["steady"] and r["grown"] and r["trims"] == 2
    assert r["released_mb"] > 50, r  # the 64 MB hole went back to the OS


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallinfo2 is glibc's")
def test_heap_watch_waits_until_a_late_freed_block_is_gone():
    """XLA:CPU frees a step's temporaries on its own thread, just after the outputs are ready: the
    call after a step waits until the bytes in use are back to those before it (so the next step
    reuses the block instead of growing the heap), and gives up after TIMEOUT_S when they are not."""
    script = r"""
import ctypes, json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from sharding.host_memory import HeapWatch, keep_freed_host_memory
keep_freed_host_memory()
libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
watch = HeapWatch()
watch()                                          # the first call (trims the set-up's holes)
watch.before_step()
block = libc.malloc(32 << 20); ctypes.memset(block, 1, 32 << 20)   # a step's temporaries
threading.Timer(0.02, libc.free, (block,)).start()                 # freed late, on another thread
t0 = time.perf_counter(); watch(); waited = time.perf_counter() - t0
watch.before_step(); watch()                     # nothing held: no wait
watch.before_step()
kept = libc.malloc(32 << 20); ctypes.memset(kept, 1, 32 << 20)     # still held: a timeout
t1 = time.perf_counter(); watch(); timed_out_after = time.perf_counter() - t1
print(json.dumps({"waited": waited, "waits": watch.waits, "timeouts": watch.timeouts,
                  "timed_out_after": timed_out_after, "timeout": watch.TIMEOUT_S}))
"""
    env = {**os.environ, host_memory.ENV: "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["waits"] == 2 and r["timeouts"] == 1, r
    assert r["waited"] >= 0.015, r  # it waited for the other thread's free
    assert r["timeout"] <= r["timed_out_after"] < r["timeout"] + 0.5, r


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallinfo2/malloc_trim are glibc's")
def test_heap_watch_trims_a_heap_grown_back_after_a_trim_but_not_every_call():
    """A trim shrinks the heap; growing back to the old size (not beyond it) is trimmed again, but
    only once REGROW_CALLS calls have passed since the last trim."""
    script = r"""
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from sharding.host_memory import HeapWatch, keep_freed_host_memory
keep_freed_host_memory()
libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
def churn():  # 64 MB at the top of the heap, freed: the heap grows to hold it and keeps it
    b = libc.malloc(64 << 20); ctypes.memset(b, 1, 64 << 20); libc.free(b)
watch = HeapWatch()
churn(); first = watch()                         # larger than ever: trims (the top goes back)
churn(); soon = watch()                          # back to the old size right after a trim: left alone
later = [watch() for _ in range(watch.REGROW_CALLS)]  # trimmed once REGROW_CALLS calls have passed
print(json.dumps({"first": first, "soon": soon, "later": [i for i, t in enumerate(later) if t],
                  "regrow": watch.REGROW_CALLS, "trims": watch.trims}))
"""
    env = {**os.environ, host_memory.ENV: "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # calls: 1 = first (trims), 2 = soon, 3.. = later; the second trim is call 1 + REGROW_CALLS
    assert r["first"] and not r["soon"] and r["trims"] == 2, r
    assert r["later"] == [r["regrow"] - 2], r
