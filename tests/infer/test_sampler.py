"""The sampler: cached decoding equals the full forward pass, ragged batches equal single prompts,
sampling is reproducible from the seed, and EOS / length limits stop rows; streaming is
re-entrant (concurrent calls each get their own tokens, without recompiling) and no module in
infer/ holds mutable module state.

Models are tiny random float32 transformers (one with unrolled layers, one scanned) with a larger
init_std than training uses, so the logits are far from uniform and greedy argmax does not hinge on
float32 rounding (cached and uncached attention sum in different orders; differences are ~1e-6,
top-2 gaps ~1e-1).
"""

from __future__ import annotations

import ast
import functools
import gc
import threading
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.sampler import Sampler, bucket_length, generate, generate_long, pad_prompts, sample_logits
from model import build_model, preset

V = 97


@pytest.fixture(scope="module")
def gpt2():  # learned positions, LayerNorm, GELU, tied embeddings, layers unrolled
    return build_model(preset("gpt2-nano", vocab_size=V, n_layers=2, init_std=0.5, scan_layers=False), seed=0)


@pytest.fixture(scope="module")
def llama():  # RoPE, SwiGLU, RMSNorm, grouped-query attention (4 heads, 2 kv heads), layers in a lax.scan
    cfg = preset("llama-tiny", vocab_size=V, n_layers=2, d_ff=128, max_seq_len=64, init_std=0.2, scan_layers=True)
    assert cfg.kv_heads < cfg.n_heads
    return build_model(cfg, seed=1)


def greedy_without_cache(model, prompt, n):
    """Reference: rerun the whole sequence through the model (no cache) and take argmax each step.
    The sequence sits in a fixed-length buffer (one compile); causal attention makes the zeros to
    the right of it irrelevant to the logits at its last token."""
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])  # (1, L) -> (1, L, V)
    buf = np.zeros((1, len(prompt) + n), np.int32)
    buf[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        buf[0, i] = int(jnp.argmax(forward(params, jnp.asarray(buf))[0, i - 1]))
    return buf[0, len(prompt):].tolist()


PROMPTS = [[3, 14, 15, 92, 65, 35], [8, 9], [79, 32, 38, 46, 26, 43, 38, 32, 79, 50, 28]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_cached_decode_matches_full_forward(arch, request):
    model = request.getfixturevalue(arch)
    out = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for prompt, new in zip(PROMPTS, out):
        assert new == greedy_without_cache(model, prompt, 10)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ragged_batch_equals_each_prompt_alone(arch, request):
    model = request.getfixturevalue(arch)
    together = generate(model, PROMPTS, max_new_tokens=10, temperature=0)
    for prompt, new in zip(PROMPTS, together):
        assert new == generate(model, [prompt], max_new_tokens=10, temperature=0)[0]


def test_prompts_may_be_int_arrays(gpt2):
    as_lists = generate(gpt2, PROMPTS, max_new_tokens=5, temperature=0)
    as_arrays = generate(gpt2, [np.asarray(p, np.int32) for p in PROMPTS], max_new_tokens=5, temperature=0)
    assert as_lists == as_arrays


def test_same_seed_same_tokens_different_seed_different(gpt2):
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = generate(gpt2, PROMPTS, seed=0, **kw)
    assert a == generate(gpt2, PROMPTS, seed=0, **kw)
    assert a != generate(gpt2, PROMPTS, seed=1, **kw)
    assert all(len(row) == 16 and all(0 <= t < V for t in row) for row in a)


def test_top_k_1_equals_greedy(llama):
    greedy = generate(llama, PROMPTS, max_new_tokens=10, temperature=0)
    assert generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, top_k=1, seed=5) == greedy


def test_tiny_top_p_equals_greedy(llama):
    greedy = generate(llama, PROMPTS, max_new_tokens=10, temperature=0)
    assert generate(llama, PROMPTS, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5) == greedy


def test_filtering_keeps_only_the_allowed_tokens():
    # Row 0 logits favour tokens 0 > 1 > 2 > 3; top_k=2 may only give 0 or 1. Row 1: token 3 has
    # 0.7 of the mass, so top_p=0.5 keeps token 3 alone.
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]], jnp.float32))
    from jax import random

    seen_k, seen_p = set(), set()
    for s in range(200):
        key = random.key(s)
        t = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(2), jnp.float32(1.0), greedy=False, filtered=True)
        seen_k.add(int(t[0]))
        t = sample_logits(logits, key, jnp.float32(1.0), jnp.int32(0), jnp.float32(0.5), greedy=False, filtered=True)
        seen_p.add(int(t[1]))
    assert seen_k == {0, 1}
    assert seen_p == {3}


def test_eos_stops_a_row(gpt2):
    greedy = generate(gpt2, PROMPTS, max_new_tokens=10, temperature=0)
    eos = greedy[1][0]  # row 1 stops at once; the others stop at their first occurrence of it, if any
    out = generate(gpt2, PROMPTS, max_new_tokens=10, temperature=0, eos_id=eos)
    assert out[1] == [eos]
    for full, stopped in zip(greedy, out):
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert stopped == full[:cut]


def test_every_row_on_eos_ends_the_loop_early(gpt2):
    first = generate(gpt2, [PROMPTS[0]], max_new_tokens=1, temperature=0)[0][0]
    assert generate(gpt2, [PROMPTS[0]], max_new_tokens=40, temperature=0, eos_id=first) == [[first]]


def test_prompt_plus_new_tokens_beyond_max_seq_len_is_an_error(gpt2):
    max_len = gpt2.cfg.max_seq_len  # 64
    assert len(generate(gpt2, [[1] * 60], max_new_tokens=4, temperature=0)[0]) == 4  # exactly fits
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        generate(gpt2, [[1] * 60, [2]], max_new_tokens=5, temperature=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(gpt2, [[1]], max_new_tokens=max_len, temperature=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-1), "seed"),
    (dict(eos_id=V), "eos_id"),
])
def test_invalid_settings_are_errors(gpt2, kwargs, match):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(gpt2, [[1, 2]], **kwargs)


def test_invalid_prompts_are_errors(gpt2):
    with pytest.raises(ValueError, match="empty"):
        generate(gpt2, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        generate(gpt2, [[1, V]], max_new_tokens=2)


def test_repeated_calls_do_not_recompile(gpt2):
    from infer import sampler

    sampler._generate.clear_cache()
    s = Sampler(gpt2)
    s.generate([[1, 2, 3]], max_new_tokens=4, temperature=0.7, seed=0)
    # New prompt length in the same bucket, other sampling values, another Sampler of the same model.
    s.generate([[4, 5, 6, 7, 8]], max_new_tokens=4, temperature=0.9, top_k=0, seed=3, eos_id=1)
    Sampler(gpt2).generate([[9]], max_new_tokens=4, temperature=1.3, seed=7)
    assert sampler._generate._cache_size() == 1


def test_bucketing_and_left_padding():
    assert [bucket_length(n, 1000) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert bucket_length(100, 110) == 110  # capped by the room left in the context
    tokens, positions = pad_prompts([np.array([5, 6, 7]), np.array([9])], 4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(positions, [[-1, 0, 1, 2], [-1, -1, -1, 0]])


def test_generate_long_within_the_context_is_generate(gpt2):
    assert generate_long(gpt2, PROMPTS, max_new_tokens=12, temperature=0) == \
        generate(gpt2, PROMPTS, max_new_tokens=12, temperature=0)


def test_generate_long_slides_the_window_past_the_context(gpt2):
    """gpt2 has 64 positions: 6 prompt tokens + 100 new ones need a second chunk, conditioned on
    the last 32 tokens."""
    prompt = PROMPTS[0]
    out = generate_long(gpt2, [prompt], max_new_tokens=100, temperature=0)[0]
    assert len(out) == 100
    first = generate(gpt2, [prompt], max_new_tokens=58, temperature=0)[0]
    assert out[:58] == first
    context = (prompt + first)[-32:]
    assert out[58:90] == generate(gpt2, [context], max_new_tokens=32, temperature=0)[0]


# ---- re-entrant streaming ---------------------------------------------------------------------

class CompileCounter:
    """Counts XLA backend compiles (jax.monitoring events) while the `with` block runs."""

    def __enter__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def _on_event(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.n += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on_event)


class Recorder:
    """An on_token callback for a one-row call: keeps the emitted tokens and the steps they came at."""

    def __init__(self, peer_started: threading.Event | None = None, started: threading.Event | None = None):
        self.tokens, self.steps, self.rows = [], [], set()
        self.peer_started, self.started = peer_started, started

    def __call__(self, step, tokens, emitted):
        self.rows.add(len(tokens))
        if self.started is not None:
            self.started.set()
        if step == 0 and self.peer_started is not None:
            self.peer_started.wait(timeout=30)  # hold the first token until the other call streams too
        if emitted[0]:
            self.tokens.append(int(tokens[0]))
            self.steps.append(step)


# Two calls with different prompt lengths (buckets 8 and 16) and limits, so their token streams differ.
CALLS = [(PROMPTS[0], 20), (PROMPTS[2], 9)]


def _stream_concurrently(generate_fn):
    """Run both CALLS at once in two threads, each streaming into its own Recorder; the first
    token of each call waits until the other call has streamed one, so their host calls
    interleave (when the runtime runs the two programs side by side). Returns [(out, recorder)]."""
    started = [threading.Event(), threading.Event()]
    recorders = [Recorder(peer_started=started[1 - i], started=started[i]) for i in range(2)]
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def run(i):
        prompt, n = CALLS[i]
        barrier.wait(timeout=30)
        results[i] = generate_fn([prompt], max_new_tokens=n, temperature=0, on_token=recorders[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return list(zip(results, recorders))


def test_concurrent_streaming_calls_each_get_their_own_tokens(gpt2):
    """Two greedy generate calls with on_token callbacks, at once in two threads sharing one
    Sampler (one compiled program, one router): each callback receives exactly its own call's
    tokens, in step order, equal to the non-streamed output of the same call. Repeated so that
    any interleaving of the two runs' host calls is likely to have been seen."""
    s = Sampler(gpt2)
    expected = [s.generate([p], max_new_tokens=n, temperature=0)[0] for p, n in CALLS]
    assert expected[0] != expected[1][:len(expected[0])]
    for _ in range(4):
        for (out, rec), want in zip(_stream_concurrently(s.generate), expected):
            assert out == want
            assert rec.tokens == want
            assert rec.steps == list(range(len(want)))
            assert rec.rows == {1}


def test_concurrent_streaming_through_the_generate_function(gpt2):
    """The same through `generate(model, ...)`, which builds a Sampler per call."""
    expected = [generate(gpt2, [p], max_new_tokens=n, temperature=0)[0] for p, n in CALLS]
    for (out, rec), want in zip(_stream_concurrently(functools.partial(generate, gpt2)), expected):
        assert out == rec.tokens == want


def test_repeated_streaming_calls_do_not_recompile(gpt2):
    """A Sampler compiles its streaming program once per shape: a second call with the same
    shapes (other callback, other sampling values and seed) compiles nothing, and a non-streaming
    call then reuses the shared program."""
    s = Sampler(gpt2)
    s.generate([[1, 2, 3]], max_new_tokens=6, temperature=0.7, seed=0, on_token=Recorder())
    s.generate([[1, 2, 3]], max_new_tokens=6, temperature=0.7, seed=0)
    with CompileCounter() as compiles:
        rec = Recorder()
        out = s.generate([[4, 5, 6, 7]], max_new_tokens=6, temperature=1.1, top_k=0, seed=3, on_token=rec)[0]
        s.generate([[9]], max_new_tokens=6, temperature=0.2, seed=1)
    assert compiles.n == 0
    assert rec.tokens == out and len(out) == 6


def test_a_dropped_sampler_frees_its_streaming_program(gpt2):
    """Per-Sampler programs must not pile up: once a Sampler that streamed is gone, its router
    (held by its compiled program's host callback) is freed too."""
    s = Sampler(gpt2)
    s.generate([[1, 2]], max_new_tokens=3, temperature=0, on_token=Recorder())
    router = weakref.ref(s._streams)
    del s
    gc.collect()
    assert router() is None


MUTABLE_FACTORIES = {
    "list", "dict", "set", "bytearray",
    "collections.defaultdict", "collections.OrderedDict", "collections.Counter", "collections.deque",
    "collections.ChainMap", "queue.Queue", "queue.SimpleQueue", "queue.LifoQueue", "queue.PriorityQueue",
    "asyncio.Queue", "asyncio.Lock", "asyncio.Event", "asyncio.Condition", "asyncio.Semaphore",
    "itertools.count", "threading.Lock", "threading.RLock", "threading.Event", "threading.Condition",
    "threading.Semaphore", "threading.BoundedSemaphore", "threading.local",
    "weakref.WeakKeyDictionary", "weakref.WeakValueDictionary", "weakref.WeakSet",
}
MUTABLE_LITERALS = (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)


def _qualified_names(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name for the module's imports (`from collections import deque as d`:
    d -> collections.deque; `import threading as th`: th -> threading)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _is_mutable(value: ast.expr | None, names: dict[str, str]) -> bool:
    if isinstance(value, MUTABLE_LITERALS):
        return True
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    if isinstance(func, ast.Name):
        dotted = names.get(func.id, func.id)
    elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        dotted = f"{names.get(func.value.id, func.value.id)}.{func.attr}"
    else:
        return False
    return dotted in MUTABLE_FACTORIES


def _module_level(body: list[ast.stmt]):
    """Statements run at import: the module body and the blocks of its if/try/with/for (not the
    bodies of functions and classes)."""
    for node in body:
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level(getattr(node, field, []))


def mutable_module_state(path: Path) -> list[str]:
    """What test_infer_modules_hold_no_mutable_module_state forbids, found in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = _qualified_names(tree)
    found = []
    for node in _module_level(tree.body):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name) and t.id != "__all__" and _is_mutable(node.value, names):
                    found.append(f"{path}:{node.lineno}: {t.id} is a mutable {ast.unparse(node.value)[:40]}")
        functions = [node] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else []
        if isinstance(node, ast.ClassDef):
            functions = [n for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for f in functions:
            for d in f.args.defaults + [d for d in f.args.kw_defaults if d is not None]:
                if _is_mutable(d, names):
                    found.append(f"{path}:{d.lineno}: {f.name}() has a mutable default {ast.unparse(d)[:40]}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"{path}:{node.lineno}: `global {', '.join(node.names)}` rebinds module state")
    return found


def test_the_mutable_state_rule_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import collections, threading as th\nfrom weakref import WeakKeyDictionary as WKD\n"
        "A = []\nB: dict = {}\nC = set()\nD = collections.deque()\nE = th.Lock()\nF = WKD()\n"
        "G = {k: 1 for k in 'ab'}\nif True:\n    H = list()\n"
        "def f(x=[]):\n    global A\n"
        "class K:\n    def m(self, *, y={}):\n        pass\n")
    found = mutable_module_state(bad)
    for name in "ABCDEFGH":
        assert any(f": {name} is a mutable" in line for line in found), name
    assert any("f() has a mutable default" in line for line in found)
    assert any("m() has a mutable default" in line for line in found)
    assert any("global A" in line for line in found)
    good = tmp_path / "good.py"
    good.write_text(
        "import types\nMODES = ('a', 'b')\nKINDS = frozenset({'x'})\nTABLE = types.MappingProxyType({'a': 1})\n"
        "__all__ = ['MODES']\nLIMIT = 8\n"
        "def f(x=None, y=()):\n    cache = {}\n    return cache\n"
        "class K:\n    def __init__(self):\n        self.items = []\n")
    assert mutable_module_state(good) == []


def test_infer_modules_hold_no_mutable_module_state():
    """No module in infer/ keeps state at module level, so concurrent calls (threads of a server,
    two generate calls) cannot see each other's. Read with `ast`, never imported. Forbidden:
    (1) a name bound at import (module body, or an if/try/with/for block in it) to a mutable
    container: a list/dict/set literal or comprehension, or a call to list(), dict(), set(),
    bytearray() or a mutable collections/queue/asyncio/itertools.count/threading/weakref
    constructor (resolved through the module's imports), whatever the name's case: constants are
    tuples, frozensets or types.MappingProxyType; `__all__` is exempt (read by tools, by
    convention a list); (2) a mutable literal or such a call as a default argument of a
    module-level function or of a method (evaluated once, shared by every call); (3) any `global`
    statement (rebinding a module name at run time). State belongs to an object the caller owns
    (a Sampler, an Engine). Not checked: class attributes (pydantic copies field defaults) and
    containers nested inside a tuple."""
    root = Path(__file__).resolve().parents[2] / "infer"
    found = [line for path in sorted(root.rglob("*.py")) for line in mutable_module_state(path)]
    assert found == []
