"""Autoregressive sampling with a KV cache: one prefill pass, then one compiled decode loop.

    new = generate(model, [[5, 6, 7], [8]], max_new_tokens=32, temperature=0.8, top_p=0.95, seed=0)
    new[0]  # the tokens generated after [5, 6, 7] (ending with eos_id if the row stopped on it)

Prompts of different lengths share one batch: each row is left-padded to a bucketed length Lp
(a power of two, so a new prompt length rarely means a new compile). Padding tokens get position
-1, which the attention mask never attends to, and each row's real tokens get positions 0..n-1,
so every row decodes exactly as it would alone. Left padding puts every row's last prompt token
in column Lp-1, so one slice of the prefill logits starts all rows.

The model is split once into (graphdef, params) and merged inside the jitted function (as
train/step.py does). Prefill and the whole decode `lax.while_loop` are one jitted function,
cached by jax.jit on the static arguments (graphdef, B, Lp, max_new_tokens, greedy, filtered);
temperature, top-k, top-p, seed and eos_id are traced values, so changing them never recompiles.

Shape letters: B batch, Lp bucketed prompt length, N max_new_tokens, S cache slots (Lp + N), V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import KVCache

MIN_BUCKET = 8  # shortest padded prompt length: tiny prompts share one compile


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    """The carry of the decode loop (all rows advance together; finished rows are ignored).

    tokens: (B, N) int32 generated tokens (0 after a row is done); token: (B,) the last sampled
    token, fed to the next step; positions: (B,) the position that token will take; lengths: (B,)
    tokens emitted per row; done: (B,) bool; step: () tokens sampled so far; cache: the KV cache.
    """

    tokens: jax.Array
    token: jax.Array
    positions: jax.Array
    lengths: jax.Array
    done: jax.Array
    step: jax.Array
    cache: KVCache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 is greedy (argmax); otherwise the token is drawn
    from softmax(logits / temperature) restricted to the top_k most likely tokens (0 = all) and then
    to the smallest set whose probability reaches top_p (nucleus; 1.0 = all)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SamplingParams":
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be an integer >= 0 (0 = no top-k filtering)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 = no nucleus filtering)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, greedy: bool, filtered: bool) -> jax.Array:
    """Choose one token per row. logits: (B, V) float32 -> (B,) int32.

    `greedy` and `filtered` are static (they change the program); temperature, top_k (0 = off) and
    top_p (1 = off) are traced scalars. Filtering sorts each row once, keeps ranks < top_k, then
    the smallest prefix of the (renormalized) sorted distribution whose mass reaches top_p (the
    most likely token is always kept), and samples an index in sorted order.
    """
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "filtered"))
def _generate(graphdef, params, tokens, positions, seed, temperature, top_k, top_p, eos_id, *,
              max_new_tokens: int, greedy: bool, filtered: bool):
    """Prefill + decode loop. tokens, positions: (B, Lp) int32 (left padding at position -1).
    Returns the generated tokens (B, N) int32 and their counts per row (B,) int32."""
    model = nnx.merge(graphdef, params)
    B, Lp = tokens.shape
    N = max_new_tokens
    key = jax.random.key(seed)

    def choose(logits, step):  # logits (B, V) -> (B,)
        return sample_logits(logits, jax.random.fold_in(key, step), temperature, top_k, top_p,
                             greedy=greedy, filtered=filtered)

    cache = KVCache.init(model.cfg, batch=B, length=Lp + N)
    logits, cache = model(tokens, positions, cache=cache)  # (B, Lp, V)
    first = choose(logits[:, -1], 0)  # (B,)
    done = (first == eos_id) | (N == 1)
    state = DecodeState(
        tokens=jnp.zeros((B, N), jnp.int32).at[:, 0].set(first),
        token=first,
        positions=jnp.max(positions, axis=1) + 1,  # (B,) each row's prompt length
        lengths=jnp.ones((B,), jnp.int32),
        done=done,
        step=jnp.ones((), jnp.int32),
        cache=cache,
    )

    def cond(s: DecodeState):
        return (s.step < N) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        logits, cache = model(s.token[:, None], s.positions[:, None], cache=s.cache)  # (B, 1, V)
        token = choose(logits[:, 0], s.step)  # (B,)
        token = jnp.where(s.done, 0, token)
        tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1)
        done = s.done | (token == eos_id) | (s.step + 1 >= N)
        return DecodeState(tokens, token, s.positions + 1, s.lengths + (~s.done).astype(jnp.int32), done,
                           s.step + 1, cache)

    state = jax.lax.while_loop(cond, body, state)
    return state.tokens, state.lengths


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


class Sampler:
    """A model split once into (graphdef, params), ready to generate many times.

    The compiled program is shared by every Sampler of the same architecture (jax.jit caches on the
    graphdef), so building a Sampler is cheap; keeping one avoids re-splitting the model per call.
    """

    def __init__(self, model: nnx.Module):
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)

    def generate(self, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None) -> list[list[int]]:
        """See `generate`."""
        sampling = SamplingParams(float(temperature), top_k, float(top_p)).validate()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be a positive integer")
        max_new_tokens = int(max_new_tokens)
        if len(prompts) == 0:
            return []
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
        longest = max(len(r) for r in rows)
        max_seq_len = self.cfg.max_seq_len
        if longest + max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt length {longest} + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} "
                f"exceeds the model's max_seq_len {max_seq_len}"
            )
        Lp = bucket_length(longest, max_seq_len - max_new_tokens)
        tokens, positions = pad_prompts(rows, Lp)
        out, lengths = _generate(
            self.graphdef, self.params, jnp.asarray(tokens), jnp.asarray(positions),
            jnp.asarray(seed, jnp.uint32), jnp.asarray(max(sampling.temperature, 1e-6), jnp.float32),
            jnp.asarray(sampling.top_k, jnp.int32), jnp.asarray(sampling.top_p, jnp.float32),
            jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32),
            max_new_tokens=max_new_tokens, greedy=sampling.greedy, filtered=sampling.filtered,
        )
        out, lengths = np.asarray(out), np.asarray(lengths)
        return [out[i, :lengths[i]].tolist() for i in range(len(rows))]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns the new tokens per row.

    prompts: B token-id sequences (lists or int arrays) of any lengths >= 1, generated together.
    temperature: 0 = greedy (argmax); else sample softmax(logits / temperature), filtered by
    top_k (0 = off) and top_p (nucleus, 1.0 = off). The same `seed` gives the same tokens.
    eos_id: a row stops after emitting it (it is the last token of that row's list); every row
    stops after max_new_tokens, and the loop ends as soon as every row has stopped.
    Raises ValueError when a prompt plus max_new_tokens exceeds `model.cfg.max_seq_len`, or for an
    empty prompt, a token outside the vocabulary, or an invalid sampling setting.
    """
    return Sampler(model).generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, eos_id=eos_id)


def generate_long(model: nnx.Module, prompts: Sequence[Sequence[int] | np.ndarray], *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  eos_id: int | None = None) -> list[list[int]]:
    """`generate`, but without the context limit: when prompt + new tokens exceed max_seq_len, it
    generates in chunks, each conditioned on the last max_seq_len // 2 tokens (nanoGPT's generate
    crops the context the same way, recomputing it for every token). Within the limit it is
    exactly `generate`.
    """
    sampler = Sampler(model)
    window = model.cfg.max_seq_len
    rows = [list(np.asarray(p, dtype=np.int64).reshape(-1)) for p in prompts]
    if all(len(r) + max_new_tokens <= window for r in rows):
        return sampler.generate(rows, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, eos_id=eos_id)
    keep = max(window // 2, 1)
    new: list[list[int]] = [[] for _ in rows]
    active = list(range(len(rows)))
    chunk = 0
    while active:
        contexts = [(rows[i] + new[i])[-keep:] for i in active]
        n = min(max_new_tokens - len(new[active[0]]), window - max(len(c) for c in contexts))
        out = sampler.generate(contexts, max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=(seed + 7919 * chunk) % 2**32, eos_id=eos_id)
        still = []
        for i, toks in zip(active, out):
            new[i].extend(toks)
            if not (eos_id is not None and toks and toks[-1] == eos_id) and len(new[i]) < max_new_tokens:
                still.append(i)
        active, chunk = still, chunk + 1
    return new


def generate_text(model: nnx.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Text in, text out: encode each prompt (an empty one starts from EOS), generate with
    `generate_long`, and decode the new tokens (without the EOS that stopped a row)."""
    ids = []
    for p in prompts:
        t = [int(i) for i in tokenizer.encode(p)]
        if not t:
            if tokenizer.eos_id is None:
                raise ValueError(f"an empty prompt needs an EOS token to start from; the {tokenizer.kind} "
                                 "tokenizer has none")
            t = [tokenizer.eos_id]
        ids.append(t)
    out = generate_long(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, seed=seed, eos_id=tokenizer.eos_id)
    eos = tokenizer.eos_id
    return [tokenizer.decode(t[:-1] if (eos is not None and t and t[-1] == eos) else t) for t in out]
