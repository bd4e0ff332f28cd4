"""The serving engine: a fixed set of slots, continuous batching, one thread; no web code.

    engine = Engine(model, tokenizer, slots=8)
    engine.start()                                   # compiles every program now (warm-up)
    handle = engine.submit(prompt_ids, SamplingOptions(max_tokens=64, temperature=0.7, stop=("\\n\\n",)),
                           on_event)                 # returns at once; on_event runs on the engine thread
    text, ids, summary = engine.generate(prompt_ids, SamplingOptions(temperature=0))   # blocking
    engine.shutdown()

Design (after JetStream's prefill / insert / generate split, in one thread):
- The decode state holds `slots` rows of KV cache, one per running request, each at its own
  position: KVCache.index is (slots,), the position of the token each row feeds next, and a row's
  column j holds its position j (model/transformer.py writes each row at its own index). With more
  than one slot each layer's keys and values are a buffer of their own (KVCache per_layer), which a
  step updates in place and attends over without copying it out of a stack.
- A prefill runs the LM head only when the request asks for prompt logprobs (echo): the first new
  token comes from the decode step that feeds the prompt's last token.
- A waiting request takes a free slot between decode steps: its prompt but the last token is
  prefilled alone (right-padded to a power-of-two bucket, so there is one prefill program per
  bucket) and written into the slot's cache row, together with the slot's sampling settings; the
  last prompt token is fed by the next decode step, whose logits give the first new token. So
  there is one place where tokens are chosen, and the prefill's logits give the log-probability
  of every prompt token (`echo_logprobs`).
- One jitted decode step advances every slot (idle ones too, harmlessly: their index stays put) and
  returns each slot's token. The loop is pipelined: step k+1 is dispatched (its input tokens are
  step k's, still on device) before the host turns step k's tokens into text, checks stops and
  limits and frees finished slots, so host work overlaps device work. A request that ended at step
  k rides step k+1 too; that token is dropped, and a waiting request takes the slot before k+2.
  When every active row is greedy the step skips the sampling branch at run time (lax.cond).
- Structured output (SamplingOptions.grammar, infer/structured.py): the step always takes a (B, V)
  mask of allowed tokens (logits of the others -> -inf before choosing, greedy or sampled); with no
  grammar running it is one cached all-True device array, so no program variant is added and
  nothing is sent per step. A grammar's mask depends on the token just chosen, so while such a
  request runs the loop emits each step before building the next (not pipelined).
- Sampling settings (temperature, top-k, top-p, min-p, repetition penalty, seed) are per-slot
  arrays: requests with different settings share one compiled step. The step exists in four
  variants, all compiled at start-up: with or without the top-k/top-p sort (only when some slot
  uses it) and with or without the top-20 log-probabilities (only when some slot asks for them).
  A row's token does not depend on the variant, its slot or the other rows: token i of a request
  is drawn with key fold_in(key(seed), i), and rows without top-k/top-p sample the unsorted
  distribution in both variants.
- The decode state is donated to each program (updated in place). The engine thread is the only
  one touching JAX; `submit` only validates and queues.
- On a mesh (`layout`, infer/sharded.py: `python -m infer serve --mesh tensor=8`) every program is
  compiled for it: the weights stay split as loaded, the KV cache over KV heads (`tensor`) and,
  with every per-slot array, over the slots (`data`); the host fetches only each step's tokens.

Log-probabilities are float32 log-softmax of the model's raw logits (the model's own distribution,
before the repetition penalty, temperature and filters), as the evaluation harnesses that score
text expect; the chosen token's logprob is taken from the same distribution.

Shape letters: B slots, S max_context (cache columns), Lp bucketed prefill length, V vocab.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import math
import os
import random
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.detokenize import IncrementalDecoder
from infer.quantize import dequantize_params, prepare
from infer.sampler import MIN_BUCKET, bucket_length, penalize_repeats, sample_logits
from infer.sharded import Layout, constrain_cache, constrain_rows, tracing
from infer.stops import StopMatcher
from infer.structured import Grammar
from model.transformer import KVCache, per_layer_params

log = logging.getLogger(__name__)

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's limit)
MAX_STOPS = 64  # most stop strings per request (the server allows fewer)


class EngineError(ValueError):
    """A request the engine cannot take; str(e) is one line for the client."""


class QueueFull(EngineError):
    """The waiting queue holds max_queue requests."""


class PromptTooLong(EngineError):
    """prompt + max_tokens > max_context."""


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How one request is continued. temperature 0 = greedy; top_k 0, top_p 1, min_p 0 and
    repetition_penalty 1 are off (see infer.sampler.SamplingParams for each rule). seed None: the
    engine picks one. stop: strings (trimmed from the output); stop_token_ids: ids that end the
    request besides the tokenizer's EOS. logprobs k: each generated token's logprob and its k most
    likely alternatives. echo_logprobs: the logprob of every prompt token (the first is None).
    max_tokens 0 generates nothing (with echo_logprobs: score the prompt only). grammar: a compiled
    response_format (infer/structured.py, for this engine's tokenizer): each token is chosen among
    those the grammar allows; the request ends ("stop") when the grammar is complete, or is cut by
    max_tokens ("length", the output then incomplete) like any other."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    echo_logprobs: bool = False
    grammar: Grammar | None = None


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    text: str  # the token's own text (a partial UTF-8 piece decodes with errors="replace")
    logprob: float
    top: list[tuple[int, str, float]]  # k alternatives (id, text, logprob), most likely first


@dataclasses.dataclass
class Event:
    """What a request produced since its last event (delivered in order, on the engine thread)."""

    text: str  # never half a character; stop strings never appear
    token_ids: list[int]  # generated ids this event covers (an EOS / stop id that ended it included)
    logprobs: list[TokenLogprob] | None  # one per token when options.logprobs is not None
    prompt_logprobs: list[float | None] | None  # first event only, with options.echo_logprobs
    finish_reason: str | None  # None while running; "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int  # so far
    time: float  # time.perf_counter() when the tokens were produced


class RequestHandle:
    """A submitted request: its id, timings, and `cancel()`."""

    def __init__(self, request_id: int, engine: "Engine"):
        self.id = request_id
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # when it got a slot
        self.finished_at: float | None = None
        self.finish_reason: str | None = None
        self.seed: int | None = None  # the seed used (the engine's pick when options.seed is None)
        self._engine = engine
        self._cancelled = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Free the request's slot before the next decode step (or drop it from the queue); its final
        Event has finish_reason "cancelled". No effect once it has finished."""
        self._cancelled = True
        self._engine._wake()


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """The decode state: per slot, its cache row and sampling settings (all arrays, all donated).

    cache.index (B,): the position of `token`, fed next; token (B,) int32; count (B,) tokens
    generated (the RNG counter); seen (B, V) bool, tokens in the row so far (repetition penalty);
    temperature, top_p, min_p, penalty (B,) float32; top_k (B,) int32; seed (B, 2) uint32."""

    cache: KVCache
    token: jax.Array
    count: jax.Array
    seen: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    penalty: jax.Array
    seed: jax.Array


class StaticGraph:
    """A model's nnx GraphDef as a jit static argument, hashed once. jit hashes its static
    arguments on every call, and flax hashes a GraphDef by walking the whole graph in Python
    (~25 us of the ~0.15 ms it takes the host to dispatch a decode step of the quickstart model)."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (other.graphdef is self.graphdef or
                                                   (other._hash == self._hash and other.graphdef == self.graphdef))


def _materialize(graph: StaticGraph, rest, layers):
    """The model from its per-layer weights (dequantized here when int8) and those weights."""
    graphdef = graph.graphdef
    layers = dequantize_params(layers)
    blocks = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)  # unused by the cached forward: dropped
    return nnx.merge(graphdef, {**dequantize_params(rest), "blocks": blocks}), layers


def _shard_state(state: SlotState, layout: Layout | None) -> SlotState:
    """The decode state split over the layout's mesh: the cache over KV heads and, like every
    per-slot array, over the batch axes (the slots); unchanged on one device."""
    if layout is None:
        return state
    rows = {f.name: constrain_rows(getattr(state, f.name), layout) for f in dataclasses.fields(state)
            if f.name != "cache"}
    return SlotState(cache=constrain_cache(state.cache, layout), **rows)


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "layout"))
def _init_state(*, cfg, slots: int, layout: Layout | None = None) -> SlotState:
    B, V = slots, cfg.vocab_size
    cache = KVCache.init(cfg, batch=B, length=cfg.max_seq_len, per_layer=KVCache.per_layer_for(B))
    cache = dataclasses.replace(cache, index=jnp.zeros((B,), jnp.int32))
    f32 = lambda v: jnp.full((B,), v, jnp.float32)  # noqa: E731
    state = SlotState(cache, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32), jnp.zeros((B, V), bool),
                      f32(0.0), jnp.zeros((B,), jnp.int32), f32(1.0), f32(0.0), f32(1.0), jnp.zeros((B, 2), jnp.uint32))
    return _shard_state(state, layout)


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"), donate_argnames=("state",))
def _prefill(rest, layers, state: SlotState, tokens, positions, targets, last, slot, temperature, top_k, top_p,
             min_p, penalty, seed, echo, *, graphdef, layout: Layout | None = None):
    """Prefill one prompt (all but its last token) into slot `slot` and set the slot's settings.
    tokens, positions, targets: (1, Lp) int32, right-padded (position -1); targets[j] is the prompt
    token after column j; last: the prompt's last token (fed by the next decode step).
    Returns the state and the prompt logprobs (Lp,) float32, computed only when `echo` (bool):
    else zeros, and the prefill skips the LM head (a quarter of its work on the quickstart model:
    the next token comes from the decode step that feeds `last`). layout: the mesh and rules the
    state is split by (infer/sharded.py), None on one device."""
    model, layers = _materialize(graphdef, rest, layers)
    cfg = model.cfg
    S, V = state.cache.length, cfg.vocab_size
    Lp = tokens.shape[1]
    one = None if layout is None else layout.for_batch(1)  # one row: replicated over the slots' axes
    with tracing(one):
        cache = constrain_cache(KVCache.init(cfg, batch=1, length=Lp, per_layer=state.cache.per_layer), one)
        hidden, cache = model(tokens, positions, cache=cache, layer_params=layers, head=False)  # (1, Lp, D)

    def prompt_logprobs():
        logp = jax.nn.log_softmax(model.logits(hidden)[0].astype(jnp.float32), axis=-1)  # (Lp, V)
        return jnp.take_along_axis(logp, targets[0, :, None], axis=-1)[:, 0]  # (Lp,)

    prompt_lp = jax.lax.cond(echo, prompt_logprobs, lambda: jnp.zeros((Lp,), jnp.float32))
    c, z = state.cache, jnp.zeros((), jnp.int32)

    def put_row(buf, row):  # the row's [:Lp] into a stacked cache (a leading layers axis) or one layer's buffer
        return jax.lax.dynamic_update_slice(buf, row.astype(buf.dtype), (z,) * (buf.ndim - 4) + (slot, z, z, z))

    k, v = jax.tree.map(put_row, c.k, cache.k), jax.tree.map(put_row, c.v, cache.v)
    row = jnp.full((1, S), -1, jnp.int32).at[:, :Lp].set(positions)  # the rest of the row: empty
    pos = jax.lax.dynamic_update_slice(c.positions, row, (slot, z))
    n_before = jnp.sum(positions >= 0).astype(jnp.int32)  # the last token's position
    seen = jnp.zeros((V,), bool).at[jnp.where(positions[0] >= 0, tokens[0], V)].set(True, mode="drop")
    seen = seen.at[last].set(True)
    put = lambda a, x: a.at[slot].set(x)  # noqa: E731
    state = SlotState(KVCache(k, v, pos, put(c.index, n_before)), put(state.token, last), put(state.count, 0),
                      put(state.seen, seen), put(state.temperature, temperature), put(state.top_k, top_k),
                      put(state.top_p, top_p), put(state.min_p, min_p), put(state.penalty, penalty),
                      put(state.seed, seed))
    return _shard_state(state, layout), prompt_lp


def _choose(logits, s: SlotState, filtered: bool, active):
    """logits (B, V) float32 -> (B,) int32, each row by its own settings and its own key. When no
    active row samples (all greedy), the sampling branch (a key and V random numbers per row) is
    skipped at run time: a greedy row's token is the argmax either way."""
    logits = penalize_repeats(logits, s.seen, s.penalty[:, None])
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(active & (s.temperature > 0)), lambda: _sample(logits, greedy, s, filtered),
                        lambda: greedy)


def _sample(logits, greedy, s: SlotState, filtered: bool):
    """_choose's rows with temperature > 0 sampled, the others `greedy`."""
    scaled = logits / jnp.where(s.temperature > 0, jnp.maximum(s.temperature, 1e-6), 1.0)[:, None]  # as the sampler
    floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(s.min_p)[:, None]  # log 0 = -inf: off
    scaled = jnp.where(scaled >= floor, scaled, -jnp.inf)  # min-p, on the tempered distribution (as the sampler)
    keys = jax.vmap(lambda sd, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(sd[0]), sd[1]), n))(
        s.seed, s.count)

    def one(row, key, top_k, top_p):  # row (V,): temperature and min-p already applied
        plain = sample_logits(row[None], key, 1.0, top_k, top_p, greedy=False, filtered=False)[0]
        if not filtered:
            return plain
        cut = sample_logits(row[None], key, 1.0, top_k, top_p, greedy=False, filtered=True)[0]
        return jnp.where((top_k > 0) | (top_p < 1), cut, plain)

    sampled = jax.vmap(one)(scaled, keys, s.top_k, s.top_p)
    return jnp.where(s.temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "filtered", "top", "layout"), donate_argnames=("state",))
def _decode(rest, layers, state: SlotState, active, allowed, *, graphdef, filtered: bool, top: bool,
            layout: Layout | None = None):
    """One token for every slot. active (B,) bool: idle slots keep their index and count. allowed
    (B, V) bool: the tokens each row may choose (all True but for rows under a grammar; the
    logprobs stay those of the model's own distribution).
    Returns the state and (token (B,), its logprob (B,)[, top ids (B, k), top logprobs (B, k)])."""
    model, layers = _materialize(graphdef, rest, layers)
    B = state.token.shape[0]
    c = state.cache
    with tracing(layout):
        logits, cache = model(state.token[:, None], c.index[:, None], cache=c, layer_params=layers)  # (B, 1, V)
    logits = logits[:, 0].astype(jnp.float32)  # (B, V)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token = _choose(jnp.where(allowed, logits, -jnp.inf), state, filtered, active)
    token_lp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    cache = dataclasses.replace(cache, index=jnp.where(active, c.index + 1, c.index))
    seen = state.seen.at[jnp.arange(B), token].set(True)
    state = _shard_state(dataclasses.replace(state, cache=cache, token=jnp.where(active, token, state.token),
                                             count=state.count + active.astype(jnp.int32), seen=seen), layout)
    out = (token, token_lp)
    if top:
        top_lp, top_ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, logp.shape[-1]))  # (B, k)
        out += (top_ids.astype(jnp.int32), top_lp)
    return state, out


def prefill_buckets(max_context: int) -> list[int]:
    """Every prefill length a prompt can be padded to (`bucket_length` of 1..max_context - 1)."""
    out, b = [], MIN_BUCKET
    while b < max_context:
        out.append(b)
        b *= 2
    return out + [max_context]


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def validate_options(o: SamplingOptions, vocab_size: int) -> SamplingOptions:
    """The options with lists made tuples, or EngineError naming the field and what is allowed."""
    if not isinstance(o, SamplingOptions):
        raise EngineError(f"options must be a SamplingOptions, not {type(o).__name__}")
    if not _is_int(o.max_tokens) or o.max_tokens < 0:
        raise EngineError(f"max_tokens={o.max_tokens!r} must be an integer >= 0")
    if not _is_real(o.temperature) or o.temperature < 0:
        raise EngineError(f"temperature={o.temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not _is_int(o.top_k) or o.top_k < 0:
        raise EngineError(f"top_k={o.top_k!r} must be an integer >= 0 (0 = off)")
    if not _is_real(o.top_p) or not 0 < o.top_p <= 1:
        raise EngineError(f"top_p={o.top_p!r} must be in (0, 1] (1 = off)")
    if not _is_real(o.min_p) or not 0 <= o.min_p < 1:
        raise EngineError(f"min_p={o.min_p!r} must be in [0, 1) (0 = off)")
    if not _is_real(o.repetition_penalty) or o.repetition_penalty <= 0:
        raise EngineError(f"repetition_penalty={o.repetition_penalty!r} must be a finite number > 0 (1 = off)")
    if o.seed is not None and not _is_int(o.seed):
        raise EngineError(f"seed={o.seed!r} must be an integer or None")
    stop = (o.stop,) if isinstance(o.stop, str) else o.stop
    if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
        raise EngineError("stop must be a list of non-empty strings")
    if len(stop) > MAX_STOPS:
        raise EngineError(f"stop has {len(stop)} strings; at most {MAX_STOPS} are allowed")
    ids = o.stop_token_ids
    if not isinstance(ids, (tuple, list)) or not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
        raise EngineError(f"stop_token_ids must be a list of token ids in [0, {vocab_size})")
    if o.logprobs is not None and (not _is_int(o.logprobs) or not 0 <= o.logprobs <= MAX_LOGPROBS):
        raise EngineError(f"logprobs={o.logprobs!r} must be None or an integer in [0, {MAX_LOGPROBS}]")
    if not isinstance(o.echo_logprobs, (bool, np.bool_)):
        raise EngineError(f"echo_logprobs={o.echo_logprobs!r} must be true or false")
    if o.grammar is not None and not isinstance(o.grammar, Grammar):
        raise EngineError(f"grammar must be an infer.structured.Grammar or None, not {type(o.grammar).__name__}")
    return dataclasses.replace(o, stop=tuple(stop), stop_token_ids=tuple(int(i) for i in ids))


class _Request:
    """Host-side state of one request (touched by the engine thread only, after submit)."""

    def __init__(self, handle, prompt, options, on_event, seed, tokenizer):
        self.handle = handle
        self.prompt = prompt  # (n,) int32
        self.options = options
        self.on_event = on_event
        self.seed = seed
        self.decoder = IncrementalDecoder(tokenizer)
        self.matcher = StopMatcher(options.stop)
        self.stop_ids = frozenset(options.stop_token_ids)
        self.constraint = None if options.grammar is None else options.grammar.matcher()  # infer.structured.Matcher
        self.completion = 0
        self.prompt_logprobs: list | None = None  # sent with the first event
        self.slot: int | None = None


class Engine:
    """Continuous batching over `slots` KV-cache rows (see the module docstring).

    model: a Transformer (its cfg gives max_context = max_seq_len); tokenizer: a model/tokenizer.py
    Tokenizer (EOS always stops). max_queue: requests that may wait for a slot before submit raises
    QueueFull. quantize: None/"none" or "int8" (weights stored int8, dequantized inside each program).
    layout: the mesh and rules the model's parameters are split by (infer/sharded.py: a model loaded
    with `load_sharded`); the KV cache and per-slot state are then split too, the slots over the
    batch axes (so `slots` must divide over them), the KV heads over `tensor`. None: one device.
    """

    def __init__(self, model, tokenizer, *, slots: int = 8, max_queue: int = 64, name: str = "model",
                 quantize: str | None = None, layout: Layout | None = None):
        if not _is_int(slots) or slots < 1:
            raise EngineError(f"slots={slots!r} must be an integer >= 1")
        if not _is_int(max_queue) or max_queue < 0:
            raise EngineError(f"max_queue={max_queue!r} must be an integer >= 0")
        if layout is not None and slots % layout.batch_shards:
            raise EngineError(f"slots={slots} does not divide over the {layout.batch_shards} devices the batch maps "
                              f"to on mesh {layout.describe()}; use a multiple of {layout.batch_shards}")
        self.layout = layout
        self.name = name
        self.slots = int(slots)
        self.max_queue = int(max_queue)
        self.tokenizer = tokenizer
        self.cfg = cfg = model.cfg
        self.max_context = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self.buckets = prefill_buckets(self.max_context)
        graphdef, state = nnx.split(model)
        params = prepare(nnx.to_pure_dict(state), quantize)
        # Weights cut per layer once, here: a step that sliced the stacked ones would copy every
        # weight on every call (see Transformer.__call__'s layer_params).
        self._layers = per_layer_params(params["blocks"], cfg.n_layers)
        self._rest = {k: v for k, v in params.items() if k != "blocks"}
        self._graphdef = StaticGraph(graphdef)

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiting: collections.deque[_Request] = collections.deque()
        self._slot_req: list[_Request | None] = [None] * self.slots
        self._ids = itertools.count(1)
        self._seeds = random.SystemRandom()
        self._accepting = True
        self._stop = False
        self._ready = False
        self._thread: threading.Thread | None = None
        self._state: SlotState | None = None
        self._token_texts: dict[int, str] = {}
        # per-slot host copies of what picks the step variant
        self._filtered = np.zeros(self.slots, bool)
        self._top = np.zeros(self.slots, bool)
        self.steps = 0
        self._pending: tuple | None = None  # (outputs, slot requests) of the step in flight
        self._all_allowed: jax.Array | None = None  # (B, V) True on device: the mask when no slot has a grammar

    # ---------------------------------------------------------------- device programs

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Compile every program (each prefill bucket, the four decode variants), then start the
        engine thread. Returns when the engine is ready."""
        if self._thread is not None:
            return
        t0 = time.perf_counter()
        self._state = self._new_state()
        self._all_allowed = jax.device_put(np.ones((self.slots, self.vocab_size), bool), self._state.seen.sharding)
        self._compile_all()
        for Lp in self.buckets:  # run each once too (jit-cache hits now): nothing is left for a request
            self._state, lp = _prefill(self._rest, self._layers, self._state, *self._prefill_inputs(Lp),
                                       graphdef=self._graphdef, layout=self.layout)
            jax.block_until_ready(lp)
        active = np.zeros(self.slots, bool)
        for filtered, top in itertools.product((False, True), repeat=2):
            self._state, out = _decode(self._rest, self._layers, self._state, active, self._all_allowed,
                                       graphdef=self._graphdef, filtered=filtered, top=top, layout=self.layout)
            jax.block_until_ready(out)
        self._state = self._new_state()
        jax.block_until_ready(self._state)
        log.info("engine %s: %d prefill buckets and 4 decode variants compiled in %.1f s", self.name,
                 len(self.buckets), time.perf_counter() - t0)
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._ready = True
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready and not self._stop

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let running and waiting ones finish within grace_s, cancel the rest,
        stop the engine thread."""
        deadline = time.perf_counter() + max(grace_s, 0.0)
        with self._cond:
            self._accepting = False
            while self._thread is not None and (self._waiting or any(self._slot_req)):
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            pending = list(self._waiting) + [r for r in self._slot_req if r is not None]
        for r in pending:
            r.handle.cancel()
        if self._thread is None:  # never started: nobody else will answer the queue
            with self._cond:
                waiting, self._waiting = list(self._waiting), collections.deque()
            for r in waiting:
                self._finish(r, "", [], None, "cancelled", time.perf_counter())
            self._stop = True
            return
        with self._cond:
            while self._waiting or any(self._slot_req):
                self._cond.wait(0.1)
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        self._ready = False

    # ---------------------------------------------------------------- requests

    def submit(self, prompt_ids: Sequence[int], options: SamplingOptions,
               on_event: Callable[[Event], None]) -> RequestHandle:
        """Queue a request; returns at once (never waits on JAX). on_event(Event) is called on the
        engine thread, in order, the last time with a finish_reason. Raises QueueFull,
        PromptTooLong, or EngineError for an invalid prompt or option."""
        options = validate_options(options, self.vocab_size)
        try:
            prompt = np.asarray(prompt_ids)
        except (TypeError, ValueError, OverflowError):
            prompt = None
        if prompt is not None and prompt.ndim == 1 and prompt.size == 0:
            raise EngineError("the prompt is empty; give at least one token")
        if prompt is None or prompt.ndim != 1 or prompt.dtype.kind not in "iu":
            raise EngineError("the prompt must be a flat list of integer token ids")
        if prompt.min() < 0 or prompt.max() >= self.vocab_size:
            raise EngineError(f"the prompt has a token id outside the model's vocabulary [0, {self.vocab_size})")
        n = int(prompt.size)
        if n + options.max_tokens > self.max_context:
            raise PromptTooLong(f"prompt of {n} tokens + max_tokens {options.max_tokens} = {n + options.max_tokens} "
                                f"exceeds the model's context of {self.max_context} tokens")
        if not callable(on_event):
            raise EngineError("on_event must be callable")
        seed = options.seed if options.seed is not None else self._seeds.getrandbits(63)
        with self._cond:
            if not self._accepting or self._stop:
                raise EngineError("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            handle = RequestHandle(next(self._ids), self)
            handle.seed = seed
            self._waiting.append(_Request(handle, prompt.astype(np.int32), options, on_event, seed, self.tokenizer))
            self._cond.notify_all()
        return handle

    def generate(self, prompt_ids: Sequence[int], options: SamplingOptions | None = None
                 ) -> tuple[str, list[int], Event]:
        """Blocking: (the whole text, every generated id, a summary Event: the final event's
        finish_reason, counts and time, with all text, ids, logprobs and the prompt_logprobs)."""
        if not self.ready:
            raise EngineError("the engine is not running; call start() first")
        events: list[Event] = []
        done = threading.Event()

        def on_event(e: Event):
            events.append(e)
            if e.finish_reason is not None:
                done.set()

        self.submit(prompt_ids, options or SamplingOptions(), on_event)
        done.wait()
        text = "".join(e.text for e in events)
        ids = [t for e in events for t in e.token_ids]
        last = events[-1]
        lps = None if last.logprobs is None else [lp for e in events for lp in (e.logprobs or [])]
        summary = dataclasses.replace(last, text=text, token_ids=ids, logprobs=lps,
                                      prompt_logprobs=events[0].prompt_logprobs)
        return text, ids, summary

    def stats(self) -> dict:
        with self._lock:
            running = sum(r is not None for r in self._slot_req)
            return {"running": running, "waiting": len(self._waiting), "slots": self.slots, "slots_used": running}

    # ---------------------------------------------------------------- the engine thread

    def _wake(self):
        with self._cond:
            self._cond.notify_all()

    def _loop(self):
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not any(self._slot_req) and self._pending is None:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self._cancel_requested()
                self._admit()
                self._step()
            except Exception as e:  # a device failure: fail what runs, start from a fresh state
                log.exception("engine %s: step failed", self.name)
                self._fail_running(e)

    def _cancel_requested(self):
        with self._cond:
            gone = [r for r in self._waiting if r.handle._cancelled]
            for r in gone:
                self._waiting.remove(r)
        now = time.perf_counter()
        for r in gone:
            self._finish(r, "", [], None, "cancelled", now)
        for r in list(self._slot_req):
            if r is not None and r.handle._cancelled:
                self._finish(r, "", [], None, "cancelled", now)

    def _admit(self):
        """Insert waiting requests into free slots (each prefilled alone)."""
        while True:
            with self._cond:
                free = [i for i, r in enumerate(self._slot_req) if r is None]
                if not free or not self._waiting:
                    return
                req = self._waiting.popleft()
                slot = free[0]
                self._slot_req[slot] = req
            req.slot = slot
            req.handle.started_at = time.perf_counter()
            if req.handle._cancelled:
                self._finish(req, "", [], None, "cancelled", time.perf_counter())
                continue
            o = req.options
            n = len(req.prompt)
            prompt_lp = self._run_prefill(slot, req.prompt[:-1], req.prompt[1:], int(req.prompt[-1]), o,
                                          (req.seed & 0xFFFFFFFF, (req.seed >> 32) & 0xFFFFFFFF))
            if o.echo_logprobs:
                req.prompt_logprobs = [None] + [float(x) for x in np.asarray(prompt_lp)[:n - 1]]
            self._filtered[slot] = o.temperature > 0 and (o.top_k > 0 or o.top_p < 1)
            self._top[slot] = bool(o.logprobs)
            if o.max_tokens == 0:
                self._finish(req, "", [], None, "length", time.perf_counter())

    def _new_state(self) -> SlotState:
        """A fresh decode state, committed to the parameters' device like every program's output, so
        the programs see one kind of state (an uncommitted one would be a second jit signature: a
        prefill compiled again at the first request)."""
        state = _init_state(cfg=self.cfg, slots=self.slots, layout=self.layout)
        if self.layout is None:
            on = [x.sharding for x in jax.tree.leaves((self._rest, self._layers)) if isinstance(x, jax.Array)]
            state = jax.device_put(state, on[0] if on else jax.devices()[0])
        return state

    def _prefill_inputs(self, Lp: int) -> tuple:
        """Warm-up arguments of a prefill of bucket length Lp (an empty prompt into slot 0)."""
        z = np.zeros((1, Lp), np.int32)
        return (z, np.full((1, Lp), -1, np.int32), z, np.int32(0), np.int32(0), np.float32(1), np.int32(0),
                np.float32(1), np.float32(0), np.float32(1), np.zeros(2, np.uint32), np.bool_(False))

    def _compile_all(self):
        """Compile every program ahead of time, several at once (XLA compiles outside the GIL, so
        compiles overlap on several cores); the calls that follow find them in jit's cache."""
        def spec(tree):  # on a mesh, each array's sharding is part of the program
            def one(x):
                sharding = getattr(x, "sharding", None) if self.layout is not None else None
                return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
            return jax.tree.map(one, tree)

        params = (spec(self._rest), spec(self._layers), spec(self._state))
        jobs = [functools.partial(_prefill.lower, *params, *spec(self._prefill_inputs(Lp)), graphdef=self._graphdef,
                                  layout=self.layout) for Lp in self.buckets]
        jobs += [functools.partial(_decode.lower, *params, spec(np.zeros(self.slots, bool)), spec(self._all_allowed),
                                   graphdef=self._graphdef, filtered=f, top=t, layout=self.layout)
                 for f, t in itertools.product((False, True), repeat=2)]
        with concurrent.futures.ThreadPoolExecutor(max(2, min(len(jobs), os.cpu_count() or 2))) as pool:
            for future in [pool.submit(lambda job=job: job().compile()) for job in jobs]:
                future.result()

    def _run_prefill(self, slot, before, targets, last, o: SamplingOptions, seed) -> jax.Array:
        """Prefill `before` (the prompt but its last token) into `slot`; returns the logprobs of
        `targets` (the prompt but its first token), one per prefilled column (a device array)."""
        m = len(before)
        Lp = bucket_length(max(m, 1), self.max_context)
        tokens = np.zeros((1, Lp), np.int32)
        positions = np.full((1, Lp), -1, np.int32)
        tgt = np.zeros((1, Lp), np.int32)
        tokens[0, :m] = before
        positions[0, :m] = np.arange(m, dtype=np.int32)
        tgt[0, :m] = targets
        self._state, lp = _prefill(
            self._rest, self._layers, self._state, tokens, positions, tgt, np.int32(last), np.int32(slot),
            np.float32(o.temperature), np.int32(min(o.top_k, self.vocab_size)), np.float32(o.top_p),
            np.float32(o.min_p), np.float32(o.repetition_penalty), np.asarray(seed, np.uint32),
            np.bool_(o.echo_logprobs), graphdef=self._graphdef, layout=self.layout)
        return lp  # left on device: reading it would wait for the decode step in flight

    def _step(self):
        """Dispatch the next decode step, then turn the previous step's tokens into events while the
        device computes (the step chain stays on device: each step feeds the tokens the one before
        chose). A request that ended at the previous step still rides this one; its extra token is
        dropped, and its slot is free for the next admission.

        While a request under a grammar runs, the loop is not pipelined: its mask for the next token
        depends on the token just chosen, so the previous step's tokens are turned into events (and
        fed to the matchers) before the next step is built and dispatched."""
        pending, self._pending = self._pending, None
        if pending is not None and any(r is not None and r.constraint is not None for r in self._slot_req):
            self._emit_step(*pending)
            pending = None
        allowed = self._allowed()
        active = np.array([r is not None for r in self._slot_req])
        if active.any():
            self._state, out = _decode(self._rest, self._layers, self._state, active, allowed,
                                       graphdef=self._graphdef, filtered=bool(np.any(self._filtered & active)),
                                       top=bool(np.any(self._top & active)), layout=self.layout)
            for x in out:
                x.copy_to_host_async()  # ready by the time the next call reads it
            self._pending = (out, list(self._slot_req))
            self.steps += 1
        if pending is not None:
            self._emit_step(*pending)

    def _allowed(self) -> jax.Array:
        """The (B, V) mask of the next step: the cached all-True array when no running request has a
        grammar (no transfer), else each constrained row from its matcher. A matcher that fails (its
        llguidance limits ran out mid-reply) ends its request with finish_reason "error"."""
        constrained = [(slot, r) for slot, r in enumerate(self._slot_req) if r is not None and r.constraint is not None]
        if not constrained:
            return self._all_allowed
        allowed = np.ones((self.slots, self.vocab_size), bool)  # fresh: the device may alias host memory
        for slot, r in constrained:
            if not r.constraint.fill_mask(allowed[slot]):
                log.warning("engine %s: request %d: grammar failed mid-reply: %s", self.name, r.handle.id,
                            r.constraint.error or "no token allowed")
                self._finish(r, r.matcher.push(r.decoder.flush())[0], [], None, "error", time.perf_counter())
                allowed[slot] = True
            elif r.constraint.accepting:  # a whole value: the request's own stop ids may end it too
                allowed[slot, [t for t in r.stop_ids if t < self.vocab_size]] = True
        return jax.device_put(allowed, self._all_allowed.sharding)

    def _emit_step(self, out, reqs: list):
        """The events of one decode step's tokens, for the requests that held each slot when it ran
        (a request finished or cancelled since then gets nothing more)."""
        out = jax.device_get(out)
        now = time.perf_counter()
        tokens, lps = out[0], out[1]
        for slot, req in enumerate(reqs):
            if req is None or req.handle.finish_reason is not None or self._slot_req[slot] is not req:
                continue
            t = int(tokens[slot])
            lp = None
            if req.options.logprobs is not None:
                k = req.options.logprobs
                top = [] if not k else [(int(i), self._token_text(int(i)), float(v))
                                        for i, v in zip(out[2][slot, :k], out[3][slot, :k])]
                lp = [TokenLogprob(t, self._token_text(t), float(lps[slot]), top)]
            self._advance(req, t, lp, now)

    def _advance(self, req: _Request, t: int, lp, now: float):
        req.completion += 1
        complete = False  # the grammar took its last token: the request ends with this one
        if req.constraint is not None and t != self.eos_id and t not in req.stop_ids:
            if not req.constraint.consume(t):  # a token the mask did not allow: never expected
                log.warning("engine %s: request %d: grammar refused token %d: %s", self.name, req.handle.id, t,
                            req.constraint.error)
                self._finish(req, req.matcher.push(req.decoder.flush())[0], [t], lp, "error", now)
                return
            complete = req.constraint.complete
        if t == self.eos_id or t in req.stop_ids:
            text, hit = req.matcher.push(req.decoder.flush())
            reason = "stop"
            text += "" if hit else req.matcher.flush()
        else:
            text, hit = req.matcher.push(req.decoder.push(t))
            reason = "stop" if hit else None
            if not hit and (complete or req.completion >= req.options.max_tokens):
                tail, hit = req.matcher.push(req.decoder.flush())
                text += tail + ("" if hit else req.matcher.flush())
                reason = "stop" if hit or complete else "length"
        if reason is None:
            self._emit(req, Event(text, [t], lp, self._take_prompt_lp(req), None, len(req.prompt), req.completion,
                                  now))
        else:
            self._finish(req, text, [t], lp, reason, now)

    def _take_prompt_lp(self, req: _Request):
        lp, req.prompt_logprobs = req.prompt_logprobs, None
        return lp

    def _finish(self, req: _Request, text, ids, lp, reason, now):
        """The request's last event; frees its slot."""
        with self._cond:
            if req.slot is not None and self._slot_req[req.slot] is req:
                self._slot_req[req.slot] = None
                self._filtered[req.slot] = self._top[req.slot] = False
            req.handle.finish_reason = reason
            req.handle.finished_at = now
            self._cond.notify_all()
        if lp is None and req.options.logprobs is not None:
            lp = []
        self._emit(req, Event(text, ids, lp, self._take_prompt_lp(req), reason, len(req.prompt), req.completion, now))

    def _emit(self, req: _Request, event: Event):
        if req.on_event is None:
            return
        try:
            req.on_event(event)
        except Exception:  # a broken consumer loses its request, never the engine
            log.exception("engine %s: on_event of request %d failed; cancelling it", self.name, req.handle.id)
            req.on_event = None
            req.handle._cancelled = True

    def _fail_running(self, exc: Exception):
        now = time.perf_counter()
        for r in list(self._slot_req):
            if r is not None:
                self._finish(r, "", [], None, "error", now)
        self._pending = None
        self._state = self._new_state()

    def _token_text(self, t: int) -> str:
        text = self._token_texts.get(t)
        if text is None:
            try:
                text = self.tokenizer.decode([t])
            except ValueError:  # an id the model has but the tokenizer does not (padded vocabulary)
                text = ""
            self._token_texts[t] = text
        return text
