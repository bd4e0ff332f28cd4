"""Autoregressive sampling with a KV cache: one prefill pass, then one compiled decode loop.

    new = generate(model, [[5, 6, 7], [8]], max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)
    new[0]  # the tokens generated after [5, 6, 7] (ending with eos_id if the row stopped on it)

Prompts of different lengths share one batch: each row is left-padded to a bucketed length Lp
(a power of two, so a new prompt length rarely means a new compile). Padding tokens get position
-1, which the attention mask never attends to, and each row's real tokens get positions 0..n-1,
so every row decodes exactly as it would alone. Left padding puts every row's last prompt token
in column Lp-1, so one slice of the prefill logits starts all rows.

The model is split once into (graphdef, params) and merged inside the jitted function (as
train/step.py does). Prefill and the whole decode `lax.while_loop` are one jitted function
(`_prefill`, then `_decode_loop` of `_decode_step`, sliding with `_slide_window` past the
context), cached by jax.jit on the static arguments (graphdef, B, Lp, max_new_tokens, the
stop-array shape, and which features are on: greedy, top-k/top-p sort, min-p, repetition
penalty, sliding window); temperature, top-k, top-p, min-p, the penalty, seed, stop ids and
per-row limits are traced values, so changing them never recompiles. The decode step is kept
lean for batch 1: weights are cut per layer once before the loop, there are no host calls
unless a streaming callback is given, no sort unless top-k/top-p is set, and past the context
the window slides in an outer loop so the inner decode loop has no branch.

Streaming is re-entrant and holds no module state: each Sampler compiles its own streaming
program, whose host calls go to that Sampler's router with the call's id (a traced argument),
so concurrent calls, from threads sharing one Sampler or not, each see only their own tokens.

Shape letters: B batch, Lp bucketed prompt length, N max_new_tokens, S cache slots (Lp + N), V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from infer.quantize import dequantize_params, prepare
from infer.sharded import Layout, constrain_cache, tracing
from model.transformer import KVCache, split_layers

MIN_BUCKET = 8  # shortest padded prompt length: tiny prompts share one compile


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The carry of the decode loop (all rows advance together; finished rows are ignored).

    tokens: (B, N) int32 generated tokens (0 after a row is done); token: (B,) the last sampled
    token, fed to the next step; positions: (B,) the position that token will take; lengths: (B,)
    tokens emitted per row; done: (B,) bool; step: () tokens sampled so far; cache: the KV cache;
    history: (B, P + Lp + N) every row's prompt and generated tokens (P = longest stop sequence - 1
    columns of padding in front, so the last T tokens are always one dynamic slice); seen: (B, V)
    bool, tokens present in each row (for the repetition penalty; (B, 1) when it is off).
    """

    tokens: jax.Array
    token: jax.Array
    positions: jax.Array
    lengths: jax.Array
    done: jax.Array
    step: jax.Array
    cache: KVCache
    history: jax.Array
    seen: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy (argmax); otherwise the token is drawn
    from softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all), then
    to the smallest set whose probability reaches top_p (nucleus; 1.0 = all), and to the tokens
    whose probability is at least min_p times the most likely one's (0 = off).
    repetition_penalty (CTRL / Hugging Face rule, 1.0 = off) divides positive logits and multiplies
    negative logits of every token already in the row (prompt or generated), greedy included."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def validate(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 = no top-k filtering)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filtering)")
        if not 0.0 <= self.min_p < 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1) (0 = no min-p filtering)")
        if not np.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:  # needs the per-row sort
        return self.top_k > 0 or self.top_p < 1.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits (B, V), seen (B, V) bool: logits of seen tokens are divided by `penalty` when positive
    and multiplied by it when negative (so penalty > 1 always makes them less likely)."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, greedy: bool, filtered: bool, min_p: jax.Array | None = None) -> jax.Array:
    """Choose one token per row. logits: (B, V) float32 -> (B,) int32.

    `greedy` and `filtered` are static (they change the program); temperature, top_k (0 = off),
    top_p (1 = off) and min_p (None = off, else a traced scalar) are traced. min-p needs no sort:
    it keeps logits >= max + log(min_p). Top-k / top-p sort each row once (only when `filtered`),
    keep ranks < top_k, then the smallest prefix of the (renormalized) sorted distribution whose
    mass reaches top_p (the most likely token is always kept), and sample an index in sorted order.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if min_p is not None:
        floor = jnp.max(logits, axis=-1, keepdims=True) + jnp.log(jnp.maximum(min_p, 1e-30))
        logits = jnp.where(logits >= floor, logits, -jnp.inf)
    if not filtered:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)  # (B, V) token ids, most likely first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)  # (B, V) descending
    rank = jnp.arange(V)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    sorted_logits = jnp.where(rank < k, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # (B, V), renormalized over the top k
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly more likely tokens
    keep = (mass_before < top_p) | (rank == 0)
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)  # (B,) index into the sorted order
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class _StreamRouter:
    """Routes the compiled loop's host calls to the `on_token` of the generate call that made them.

    A compiled program can call only the host function it was traced with, so the callback of one
    call cannot be baked in without compiling per callback. Instead each Sampler owns one router:
    its streaming program calls `deliver`, passing the call's id as a traced argument, and the
    router looks that id up. Ids are unique per call, so concurrent calls (threads sharing one
    Sampler) each get exactly their own tokens; an id is forgotten when its call returns, so a
    late host call after an interrupted one finds nothing and is dropped. The table lives as long
    as the Sampler (no process-wide state).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._targets: dict[int, Callable] = {}
        self._ids = itertools.count(1)

    @contextlib.contextmanager
    def open(self, on_token: Callable) -> Iterator[int]:
        """Register `on_token` for one call; yields the id to pass to the program."""
        with self._lock:
            call_id = next(self._ids) % 2**31  # an int32 argument
            self._targets[call_id] = on_token
        try:
            yield call_id
        finally:
            with self._lock:
                del self._targets[call_id]

    def deliver(self, call_id, step, tokens, emitted) -> None:
        """The host side of the program's io_callback: step (), tokens (B,), emitted (B,) bool."""
        with self._lock:
            target = self._targets.get(int(call_id))
        if target is not None:
            target(int(step), np.asarray(tokens), np.asarray(emitted))


@dataclasses.dataclass(frozen=True)
class _Call:
    """What every step of one generate call shares, inside the trace: the model and its per-layer
    weights, the traced sampling values, stop sequences and per-row limits, and the static sizes
    and feature switches. A plain object closed over by the loop bodies, never a loop carry.

    stop_seqs: (B, M, T) int32 right-aligned stop sequences (-1 left of a shorter one; all -1:
    unused). max_new: (B,) per-row limits. min_p / penalty: None when the feature is off.
    window: 0, or the context S past which the window slides. emit(step, tokens, emitted): the
    streaming host call, or None. layout: the mesh and rules the KV cache is split by
    (infer/sharded.py), None on one device.
    """

    model: Any
    layers: Any
    key: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array | None
    penalty: jax.Array | None
    stop_seqs: jax.Array
    max_new: jax.Array
    Lp: int
    N: int
    window: int
    greedy: bool
    filtered: bool
    emit: Callable | None
    layout: Layout | None = None

    @property
    def T(self) -> int:  # longest stop sequence (rounded up to a power of two)
        return self.stop_seqs.shape[2]

    @property
    def P(self) -> int:  # history columns in front of the prompt, so the last T tokens are one slice
        return self.T - 1

    @property
    def cache_len(self) -> int:
        return self.Lp + (self.window if self.window else self.N)

    def choose(self, logits: jax.Array, step, seen: jax.Array) -> jax.Array:
        """The next token per row: logits (B, V) -> (B,) int32 (repetition penalty, then sampling)."""
        if self.penalty is not None:
            logits = penalize_repeats(logits, seen, self.penalty)
        return sample_logits(logits, jax.random.fold_in(self.key, step), self.temperature, self.top_k, self.top_p,
                             greedy=self.greedy, filtered=self.filtered, min_p=self.min_p)

    def stops(self, history: jax.Array, step) -> jax.Array:
        """(B,) bool: does each row's generated text end with one of its stop sequences?"""
        Lp, T, P = self.Lp, self.T, self.P
        tail = jax.lax.dynamic_slice_in_dim(history, step + Lp, T, axis=1)  # (B, T) last T tokens
        generated = jnp.arange(T) + step + Lp >= P + Lp  # (T,) columns that hold generated tokens
        tail = jnp.where(generated, tail, -2)
        match = (self.stop_seqs == -1) | (self.stop_seqs == tail[:, None, :])  # (B, M, T)
        return jnp.any(jnp.all(match, axis=-1) & jnp.any(self.stop_seqs >= 0, axis=-1), axis=-1)  # (B,)


def _prefill(c: _Call, tokens: jax.Array, positions: jax.Array) -> DecodeState:
    """Run the prompts (B, Lp) through the model into a fresh cache and sample every row's first
    token from the logits at column Lp - 1 (left padding puts each row's last token there)."""
    model = c.model
    B, Lp = tokens.shape
    V = model.cfg.vocab_size
    cache = constrain_cache(KVCache.init(model.cfg, batch=B, length=c.cache_len,
                                         per_layer=KVCache.per_layer_for(B)), c.layout)
    logits, cache = model(tokens, positions, cache=cache)  # (B, Lp, V)
    history = jnp.concatenate([jnp.full((B, c.P), -2, jnp.int32), jnp.where(positions >= 0, tokens, -2),
                               jnp.zeros((B, c.N), jnp.int32)], axis=1)  # (B, P + Lp + N)
    if c.penalty is not None:
        prompt_ids = jnp.where(positions >= 0, tokens, V)  # padding scatters out of range: dropped
        seen = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], prompt_ids].set(True, mode="drop")
    else:
        seen = jnp.zeros((B, 1), bool)
    first = c.choose(logits[:, -1], 0, seen)  # (B,)
    history = history.at[:, c.P + Lp].set(first)
    if c.penalty is not None:
        seen = seen.at[jnp.arange(B), first].set(True)
    if c.emit is not None:
        c.emit(0, first, jnp.ones((B,), bool))
    return DecodeState(
        tokens=jnp.zeros((B, c.N), jnp.int32).at[:, 0].set(first),
        token=first,
        positions=jnp.max(positions, axis=1) + 1,  # (B,) prompt lengths: the first token's position
        lengths=jnp.ones((B,), jnp.int32),
        done=c.stops(history, 0) | (c.max_new <= 1),
        step=jnp.ones((), jnp.int32),
        cache=cache,
        history=history,
        seen=seen,
    )


def _decode_step(c: _Call, s: DecodeState) -> DecodeState:
    """Feed every row's last token at its position, sample the next one, and record it; rows
    already done get token 0, are not counted or streamed, and stay done."""
    B = s.token.shape[0]
    logits, cache = c.model(s.token[:, None], s.positions[:, None], cache=s.cache, layer_params=c.layers)  # (B, 1, V)
    cache = constrain_cache(cache, c.layout)  # the loop carry stays split over the mesh
    token = c.choose(logits[:, 0], s.step, s.seen)  # (B,)
    token = jnp.where(s.done, 0, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
    history = jax.lax.dynamic_update_slice_in_dim(s.history, token[:, None], c.P + c.Lp + s.step, axis=1)
    seen = s.seen.at[jnp.arange(B), token].set(True) if c.penalty is not None else s.seen
    if c.emit is not None:
        c.emit(s.step, token, ~s.done)
    lengths = s.lengths + (~s.done).astype(jnp.int32)
    done = s.done | c.stops(history, s.step) | (lengths >= c.max_new)
    return DecodeState(tokens, token, s.positions + 1, lengths, done, s.step + 1, cache, history, seen)


def _slide_window(c: _Call, s: DecodeState) -> DecodeState:
    """Prefill every row's `keep - 1` tokens before s.token (keep = window // 2; left padding
    excluded) into a fresh cache at positions 0..; s.token is then decoded next, at the position
    after them (the same as prefilling the last `keep` tokens, without a second kind of step in
    the decode loop)."""
    B = s.token.shape[0]
    keep = c.window // 2
    start = c.P + c.Lp + s.step - keep  # history column of the window's first token
    ctx = jax.lax.dynamic_slice_in_dim(s.history, start, keep - 1, axis=1)  # (B, keep - 1)
    valid = ctx >= 0
    wpos = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, -1).astype(jnp.int32)  # (B, keep - 1)
    cache = constrain_cache(KVCache.init(c.model.cfg, batch=B, length=c.cache_len,
                                         per_layer=KVCache.per_layer_for(B)), c.layout)
    _, cache = c.model(jnp.where(valid, ctx, 0), wpos, cache=cache, layer_params=c.layers)
    cache = constrain_cache(cache, c.layout)
    return dataclasses.replace(s, cache=cache, positions=jnp.sum(valid, axis=1).astype(jnp.int32))


def _decode_loop(c: _Call, s: DecodeState) -> DecodeState:
    """Decode until every row is done or N tokens are sampled. Within the context it is one
    `while_loop` of `_decode_step`; past it (c.window) an outer loop of chunks, each a slide (when
    the next token would take the last position) then an inner decode loop with no branch in it,
    so a decode step stays one lean program."""

    def running(s: DecodeState):
        return (s.step < c.N) & ~jnp.all(s.done)

    def step(s: DecodeState) -> DecodeState:
        return _decode_step(c, s)

    if not c.window:
        return jax.lax.while_loop(running, step, s)

    def in_window(s: DecodeState):  # the decode loop runs until the token to feed needs a slide
        return running(s) & (jnp.max(s.positions) < c.window - 1)

    def chunk(s: DecodeState) -> DecodeState:
        s = jax.lax.cond(jnp.max(s.positions) >= c.window - 1, functools.partial(_slide_window, c), lambda s: s, s)
        return jax.lax.while_loop(in_window, step, s)

    return jax.lax.while_loop(running, chunk, s)


_STATIC_ARGS = ("graphdef", "max_new_tokens", "greedy", "filtered", "use_min_p", "penalized", "window", "layout")


def _generate_program(graphdef, params, tokens, positions, seed, temperature, top_k, top_p, min_p, penalty,
                      stop_seqs, max_new, stream_id, *, max_new_tokens: int, greedy: bool, filtered: bool,
                      use_min_p: bool = False, penalized: bool = False, window: int = 0,
                      layout: Layout | None = None, deliver: Callable | None = None):
    """Prefill + decode loop, one program (jitted by `_jit_generate`).

    tokens, positions: (B, Lp) int32 (left padding at position -1). stop_seqs: (B, M, T) int32
    stop sequences right-aligned, -1 left of a shorter one (all -1: unused); a row stops once its
    last generated tokens equal one. max_new: (B,) per-row limits (<= max_new_tokens = N).
    stream_id: () int32, passed to `deliver(stream_id, step, tokens, emitted)`, the host function
    this program streams to (None: no host calls).
    window: 0 = the prompts plus N fit the model's positions; else the model's context S, and when
    the next token to feed would take position S - 1 every row's last S // 2 tokens are prefilled
    again into a fresh cache (positions 0..) and decoding continues from there.
    layout: the mesh and rules the parameters are split by (infer/sharded.py; for this batch), None
    on one device: the KV cache is split like them, and only the tokens come back.
    Returns the generated tokens (B, N) int32 and their counts per row (B,) int32.
    """
    model = nnx.merge(graphdef, dequantize_params(params))  # int8 weights become float here, once per call

    def emit(step, token, emitted):  # ordered: the host sees the steps in order
        io_callback(deliver, None, stream_id, step, token, emitted, ordered=True)

    c = _Call(model=model, layers=split_layers(model),  # weights cut per layer once, outside the loop
              key=jax.random.key(seed), temperature=temperature, top_k=top_k, top_p=top_p,
              min_p=min_p if use_min_p else None, penalty=penalty if penalized else None,
              stop_seqs=stop_seqs, max_new=max_new, Lp=tokens.shape[1], N=max_new_tokens, window=window,
              greedy=greedy, filtered=filtered, emit=emit if deliver is not None else None, layout=layout)
    with tracing(layout):  # the model's own logical constraints resolve on the layout's mesh
        state = _decode_loop(c, _prefill(c, tokens, positions))
    return state.tokens, state.lengths


def _jit_generate(deliver: Callable | None = None):
    """`_generate_program` jitted, streaming to `deliver` (baked into the compiled program)."""
    return jax.jit(functools.partial(_generate_program, deliver=deliver), static_argnames=_STATIC_ARGS)


# Non-streaming calls of every Sampler share this one (jax.jit caches it on the static arguments,
# graphdef included); streaming calls use their Sampler's own (see _StreamRouter).
_generate = _jit_generate()


def bucket_length(n: int, limit: int) -> int:
    """The padded prompt length for a longest prompt of `n` tokens: the next power of two (at least
    MIN_BUCKET), but never more than `limit` (and never less than n)."""
    b = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return max(n, min(b, limit))


def pad_prompts(prompts: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to `length`. Returns tokens (B, length) int32 (0 in padding) and positions
    (B, length) int32: -1 in padding, 0..n-1 on each row's n real tokens."""
    B = len(prompts)
    tokens = np.zeros((B, length), np.int32)
    positions = np.full((B, length), -1, np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        if n:
            tokens[i, length - n:] = p
            positions[i, length - n:] = np.arange(n, dtype=np.int32)
    return tokens, positions


def _depth(x) -> int:
    """Nesting depth of lists (an empty list counts as one level; strings and ints are leaves)."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return 1 + max((_depth(e) for e in x), default=0)
    return 0


def _per_row(value, B: int, name: str, nested: int) -> list:
    """`value` given once for all rows (depth `nested`), or one entry per row (depth nested + 1)."""
    if value is None:
        return [[] if nested else None] * B
    rows_all_empty = len(value) == B and all(_depth(v) == 1 and len(v) == 0 for v in value)
    if _depth(value) == nested + 1 or (nested > 1 and rows_all_empty):  # an empty stop sequence is no option
        if len(value) != B:
            raise ValueError(f"{name} has {len(value)} entries; give one for all rows or one per row ({B})")
        return list(value)
    return [value] * B


def stop_array(stops_per_row: Sequence[Sequence[Sequence[int]]], V: int) -> np.ndarray:
    """Per-row lists of stop sequences -> (B, M, T) int32, right-aligned, -1 padded, with M and T
    rounded up to powers of two (at least 1) so that new stop lists rarely recompile."""
    B = len(stops_per_row)
    m = max([len(r) for r in stops_per_row] + [1])
    t = max([len(s) for r in stops_per_row for s in r] + [1])
    M, T = 1 << (m - 1).bit_length(), 1 << (t - 1).bit_length()
    out = np.full((B, M, T), -1, np.int32)
    for i, row in enumerate(stops_per_row):
        for j, seq in enumerate(row):
            seq = [int(x) for x in seq]
            if not seq:
                raise ValueError(f"row {i}: a stop sequence is empty")
            if min(seq) < 0 or max(seq) >= V:
                raise ValueError(f"row {i}: stop token ids must be in the model's vocabulary [0, {V})")
            out[i, j, T - len(seq):] = seq
    return out


class Sampler:
    """A model split once into (graphdef, params), ready to generate many times.

    The compiled program is shared by every Sampler of the same architecture (jax.jit caches on the
    graphdef), so building a Sampler is cheap; keeping one avoids re-splitting the model per call.
    Streaming calls (`on_token`) run this Sampler's own program, compiled on its first streaming
    call for each shape, so stream through one long-lived Sampler: `generate(model, ...,
    on_token=...)` builds a new Sampler and so compiles again on every call. `generate` may be
    called from several threads at once.

    quantize: None/"none" keeps the float parameters; "int8" stores every weight matrix as int8 with
    per-output-channel scales (infer/quantize.py), dequantized inside the compiled program.
    layout: the mesh and rules the model's parameters are split by (infer/sharded.py: a model loaded
    with `load_sharded`); the KV cache is then split too (KV heads over `tensor`, rows over the
    batch axes when they divide). None: one device.
    """

    def __init__(self, model: nnx.Module, quantize: str | None = None, layout: Layout | None = None):
        self.cfg = model.cfg
        self.layout = layout
        self.graphdef, state = nnx.split(model)
        self.params = prepare(nnx.to_pure_dict(state), quantize)
        self._streams = _StreamRouter()
        self._generate_streaming = _jit_generate(self._streams.deliver)  # compiled on the first streaming call

    def generate(self, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens: int | Sequence[int],
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int = 0, eos_id: int | None = None,
                 stop_tokens=None, stop_sequences=None, on_token=None, slide: bool = False) -> list[list[int]]:
        """See `generate`; `slide=True` is `generate_long`."""
        sampling = SamplingParams(float(temperature), top_k, float(top_p), float(min_p),
                                  float(repetition_penalty)).validate()
        if len(prompts) == 0:
            return []
        B = len(prompts)
        limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple, np.ndarray)) else [max_new_tokens] * B
        if len(limits) != B:
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {B} prompts")
        for n in limits:
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"max_new_tokens={n} must be a positive integer")
        max_new = max(int(n) for n in limits)
        V = self.cfg.vocab_size
        rows = []
        for i, p in enumerate(prompts):
            arr = np.asarray(p, dtype=np.int64).reshape(-1)
            if arr.size == 0:
                raise ValueError(f"prompt {i} is empty; give at least one token (e.g. the tokenizer's EOS)")
            if arr.min() < 0 or arr.max() >= V:
                raise ValueError(f"prompt {i} has a token id outside the model's vocabulary [0, {V})")
            rows.append(arr.astype(np.int32))
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be an integer in [0, 2**32)")
        if eos_id is not None and not 0 <= eos_id < V:
            raise ValueError(f"eos_id={eos_id} is outside the model's vocabulary [0, {V})")
        stop_rows = [[[t] for t in toks] for toks in _per_row(stop_tokens, B, "stop_tokens", 1)]
        for i, seqs in enumerate(_per_row(stop_sequences, B, "stop_sequences", 2)):
            stop_rows[i] += [list(s) for s in seqs]
        if eos_id is not None:
            stop_rows = [[[eos_id]] + r for r in stop_rows]
        stops = stop_array(stop_rows, V)

        S = self.cfg.max_seq_len
        longest = max(len(r) for r in rows)
        window = 0
        if slide and longest + max_new > S:
            keep = max(S // 2, 1)
            rows = [r[-keep:] for r in rows]  # as the window will: the last S // 2 tokens
            window, longest = S, max(len(r) for r in rows)
            Lp = bucket_length(longest, keep)
        elif longest + max_new > S:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new} = {longest + max_new} "
                f"exceeds the model's max_seq_len {S}"
            )
        else:
            Lp = bucket_length(longest, S - max_new)
        tokens, positions = pad_prompts(rows, Lp)
        program = _generate if on_token is None else self._generate_streaming
        stream = contextlib.nullcontext(0) if on_token is None else self._streams.open(on_token)
        with stream as stream_id:  # on_token is registered under a fresh id for the length of this call
            out, lengths = program(
                self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions),
                jnp.asarray(seed, jnp.uint32), jnp.asarray(max(sampling.temperature, 1e-6), jnp.float32),
                jnp.asarray(sampling.top_k, jnp.int32), jnp.asarray(sampling.top_p, jnp.float32),
                jnp.asarray(sampling.min_p, jnp.float32), jnp.asarray(sampling.repetition_penalty, jnp.float32),
                jnp.asarray(stops), jnp.asarray(limits, jnp.int32), jnp.asarray(stream_id, jnp.int32),
                max_new_tokens=max_new, greedy=sampling.greedy, filtered=sampling.filtered,
                use_min_p=sampling.min_p > 0 and not sampling.greedy, penalized=sampling.penalized, window=window,
                layout=None if self.layout is None else self.layout.for_batch(B),
            )
            out, lengths = np.asarray(out), np.asarray(lengths)  # waits for the program (and its host calls)
        return [out[i, :lengths[i]].tolist() for i in range(len(rows))]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int] | np.ndarray], *,
             max_new_tokens: int | Sequence[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0, eos_id: int | None = None,
             stop_tokens=None, stop_sequences=None, on_token=None, layout: Layout | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the new tokens per row.

    prompts: B token-id sequences (lists or int arrays) of any lengths >= 1, generated together.
    max_new_tokens: one limit for all rows, or one per row.
    temperature: 0 = greedy (argmax); else sample softmax(logits / temperature), filtered by
    top_k (0 = off), top_p (nucleus, 1.0 = off) and min_p (0 = off); repetition_penalty (1.0 =
    off) applies first (see SamplingParams). The same `seed` gives the same tokens.
    Stopping, per row: eos_id (all rows), stop_tokens (ids: one list for all rows or a list per
    row) and stop_sequences (token-id sequences: one list for all rows or a list per row); a row
    stops right after generating one of them (it ends that row's list), or after its limit; the
    loop ends as soon as every row has stopped.
    on_token(step, tokens, emitted): called on the host as tokens are produced (tokens: (B,) the
    step's tokens, emitted: (B,) bool, False for rows already stopped); without it the loop makes
    no host calls. Concurrent calls each get only their own tokens. Each call builds a Sampler,
    whose streaming program compiles on its first call: to stream many times, keep a Sampler.
    layout: the mesh the model is split over (see `Sampler`), None on one device.
    Raises ValueError when a prompt plus max_new_tokens exceeds `model.cfg.max_seq_len`, or for an
    empty prompt, a token outside the vocabulary, or an invalid sampling setting.
    """
    return Sampler(model, layout=layout).generate(
        prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, eos_id=eos_id, stop_tokens=stop_tokens,
        stop_sequences=stop_sequences, on_token=on_token)


def generate_long(model: nnx.Module, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens,
                  quantize: str | None = None, layout: Layout | None = None, **kwargs) -> list[list[int]]:
    """`generate`, but without the context limit: when a prompt plus the new tokens exceed
    max_seq_len, the window slides inside the compiled loop: prompts are cut to their last
    max_seq_len // 2 tokens, and whenever the next token to feed would take the last position,
    every row's last max_seq_len // 2 tokens are prefilled again and decoding continues from the
    cache (nanoGPT crops its context too, but recomputes it for every token). Rows slide together.
    Within the limit it is exactly `generate`. quantize, layout: see `Sampler`; other keyword
    arguments are `generate`'s.
    """
    return Sampler(model, quantize, layout).generate(prompts, max_new_tokens=max_new_tokens, slide=True, **kwargs)


def generate_text(model: nnx.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  stop: Sequence[str] | Sequence[Sequence[str]] | None = None, **kwargs) -> list[str]:
    """Text in, text out: encode each prompt (an empty one starts from EOS), generate with
    `generate_long`, and decode the new tokens (without the EOS that stopped a row).

    stop: stop strings, one list for all rows or one list per row. Each is encoded to a stop
    sequence (so generation stops on device), and the text is also cut before its first stop
    string (a BPE tokenizer may spell it with other tokens), the stop string excluded.
    Other keyword arguments are `generate_long`'s (min_p, repetition_penalty, on_token, quantize,
    layout, ...).
    """
    ids = []
    for p in prompts:
        t = [int(i) for i in tokenizer.encode(p)]
        if not t:
            if tokenizer.eos_id is None:
                raise ValueError(f"an empty prompt needs an EOS token to start from; the {tokenizer.kind} "
                                 "tokenizer has none")
            t = [tokenizer.eos_id]
        ids.append(t)
    stop_rows = [list(r) for r in _per_row(stop, len(prompts), "stop", 1)]
    for r in stop_rows:
        if any(not isinstance(x, str) or not x for x in r):
            raise ValueError("stop strings must be non-empty strings")
    sequences = [[[int(i) for i in tokenizer.encode(x)] for x in r] for r in stop_rows]
    out = generate_long(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_id=tokenizer.eos_id, stop_sequences=sequences, **kwargs)
    eos = tokenizer.eos_id
    texts = []
    for t, r in zip(out, stop_rows):
        text = tokenizer.decode(t[:-1] if (eos is not None and t and t[-1] == eos) else t)
        cuts = [text.find(x) for x in r if x in text]
        texts.append(text[:min(cuts)] if cuts else text)
    return texts
