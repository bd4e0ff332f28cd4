"""Speculative decoding (greedy): a small draft model proposes k tokens, the target checks them in one pass.

    out, stats = speculative_generate(target, draft, prompt, max_new_tokens=200, k=4)
    out == generate(target, [prompt], max_new_tokens=200, temperature=0)[0]   # up to float ties

Each round, with t the last accepted token at position p:
  1. the draft decodes greedily from t for k + 1 steps, proposing d_1..d_k (the extra step puts d_k
     in the draft's cache, so that a fully accepted round needs no catch-up);
  2. the target runs once over [t, d_1..d_k] (k + 1 tokens, positions p..p+k) and takes its own
     greedy choice g_0..g_k after each;
  3. n = the number of leading proposals that equal the target's choice (d_i == g_{i-1});
     d_1..d_n and g_n are emitted (n + 1 tokens: at least one per round, k + 1 at best);
  4. both caches roll back to p + n: the slots of rejected tokens get position -1, which the
     attention mask ignores, and the write index moves back so they are overwritten next round.
Every emitted token is the target's greedy choice given the tokens before it, so the output is the
target's greedy output. The whole loop is one compiled `lax.while_loop`; batch 1, no sliding
window (prompt + max_new_tokens + k + 1 must fit both models' max_seq_len).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.transformer import KVCache


def _rollback(cache: KVCache, keep_until: jax.Array) -> KVCache:
    """Forget slots >= keep_until (their positions become -1) and write there next."""
    slots = jnp.arange(cache.length)
    positions = jnp.where(slots[None, :] >= keep_until, -1, cache.positions)
    return KVCache(cache.k, cache.v, positions, keep_until.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("t_graph", "d_graph", "max_new_tokens", "k"))
def _speculate(t_graph, t_params, d_graph, d_params, prompt, *, max_new_tokens: int, k: int):
    """prompt: (1, Lp) int32. Returns tokens (N + k + 1,), rounds (), accepted proposals ()."""
    target, draft = nnx.merge(t_graph, t_params), nnx.merge(d_graph, d_params)
    Lp, N = prompt.shape[1], max_new_tokens
    length = Lp + N + k + 1
    positions = jnp.arange(Lp, dtype=jnp.int32)[None]
    t_logits, t_cache = target(prompt, positions, cache=KVCache.init(target.cfg, batch=1, length=length))
    _, d_cache = draft(prompt, positions, cache=KVCache.init(draft.cfg, batch=1, length=length))
    first = jnp.argmax(t_logits[0, -1]).astype(jnp.int32)
    out = jnp.zeros((N + k + 1,), jnp.int32).at[0].set(first)

    def cond(s):
        return s[0] < N

    def body(s):
        n_out, token, pos, out, t_cache, d_cache, rounds, accepted = s
        start = t_cache.index  # slot of `token` in both caches (they advance together)

        def draft_step(carry, _):
            tok, p, cache = carry
            logits, cache = draft(tok[None, None], p[None, None], cache=cache)
            nxt = jnp.argmax(logits[0, 0]).astype(jnp.int32)
            return (nxt, p + 1, cache), nxt

        (_, _, d_cache), proposals = jax.lax.scan(draft_step, (token, pos, d_cache), None, length=k + 1)
        proposals = proposals[:k]  # (k,) d_1..d_k
        seq = jnp.concatenate([token[None], proposals])  # (k + 1,)
        seq_pos = pos + jnp.arange(k + 1, dtype=jnp.int32)
        logits, t_cache = target(seq[None], seq_pos[None], cache=t_cache)  # (1, k + 1, V)
        choice = jnp.argmax(logits[0], axis=-1).astype(jnp.int32)  # (k + 1,) g_0..g_k
        n = jnp.sum(jnp.cumprod((proposals == choice[:k]).astype(jnp.int32)))  # leading matches
        emitted = jnp.where(jnp.arange(k + 1) < n, jnp.concatenate([proposals, proposals[-1:]]), choice[n])
        out = jax.lax.dynamic_update_slice_in_dim(out, emitted, n_out, axis=0)  # d_1..d_n, g_n, (overwritten)
        keep = start + n + 1  # token, d_1..d_n stay in the caches
        return (n_out + n + 1, choice[n], pos + n + 1, out, _rollback(t_cache, keep), _rollback(d_cache, keep),
                rounds + 1, accepted + n)

    zero = jnp.zeros((), jnp.int32)
    state = (jnp.ones((), jnp.int32), first, jnp.asarray(Lp, jnp.int32), out, t_cache, d_cache, zero, zero)
    _, _, _, out, _, _, rounds, accepted = jax.lax.while_loop(cond, body, state)
    return out, rounds, accepted


def speculative_generate(target: nnx.Module, draft: nnx.Module, prompt, *, max_new_tokens: int, k: int = 4):
    """Greedy continuation of one prompt by `max_new_tokens` tokens, drafted by `draft`.

    Returns (tokens, stats) with stats = {"rounds": target passes after the prefill,
    "accepted": draft tokens accepted, "acceptance": accepted / (rounds * k)}.
    """
    prompt = [int(t) for t in np.asarray(prompt).reshape(-1)]
    if not prompt:
        raise ValueError("the prompt is empty")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} != target vocab_size {target.cfg.vocab_size}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k} must be a positive integer")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be a positive integer")
    need = len(prompt) + max_new_tokens + k + 1
    limit = min(target.cfg.max_seq_len, draft.cfg.max_seq_len)
    if need > limit:
        raise ValueError(f"prompt {len(prompt)} + max_new_tokens {max_new_tokens} + k + 1 = {need} exceeds "
                         f"max_seq_len {limit}")
    t_graph, t_state = nnx.split(target)
    d_graph, d_state = nnx.split(draft)
    out, rounds, accepted = _speculate(t_graph, t_state, d_graph, d_state, jnp.asarray([prompt], jnp.int32),
                                       max_new_tokens=max_new_tokens, k=k)
    rounds, accepted = int(rounds), int(accepted)
    return np.asarray(out)[:max_new_tokens].tolist(), {
        "rounds": rounds, "accepted": accepted, "acceptance": accepted / max(rounds * k, 1)}
