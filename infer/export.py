"""`python -m infer export --run RUN_DIR --out FILE`: the model as one file that needs only jax + numpy.

The artifact (an .npz, read with allow_pickle=False) holds two `jax.export`-serialized programs
with the weights baked in as constants (int8 ones stay int8 and are dequantized inside):

  prefill(tokens (B, P) int32, positions (B, P) int32)
      -> logits (B, V) float32 at the last column, cache k (n_layers, B, K, C, Dh), v (n_layers, B, K, Dh, C), cache positions (B, C), index ()
  decode(token (B,) int32, position (B,) int32, k, v, cache_positions, index)
      -> logits (B, V), k, v, cache_positions, index

plus `meta` (JSON: shapes, max_seq_len, vocab size, the tokenizer, and `chat`: the chat template's
scaffold per role, its generation prompt, stop ids and stop strings, so that infer/ondevice.py can
hold a conversation with only jax and numpy; see `chat_meta`). P = max_seq_len // 2 is the
prompt window (prompts are left-padded to it at positions -1, longer ones keep their last P
tokens), and C = P + max_seq_len cache slots: the same layout `infer.sampler.generate_long` uses,
so `infer/load_exported.py` slides the window the same way and generates the same greedy tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.quantize import dequantize_params, prepare
from model.transformer import KVCache

FORMAT = "jaxlm-export-1"


def export_model(model, tokenizer_json: str | None, out: str | Path, *, batch: int = 1, quantize: str | None = None,
                 platforms: tuple[str, ...] | None = None) -> Path:
    """Serialize prefill and decode of `model` (weights included) into `out` (.npz)."""
    cfg = model.cfg
    graphdef, state = nnx.split(model)
    params = prepare(nnx.to_pure_dict(state), quantize)
    S = cfg.max_seq_len
    P, C, B = max(S // 2, 1), max(S // 2, 1) + S, batch

    def build():
        return nnx.merge(graphdef, dequantize_params(params))

    def prefill(tokens, positions):  # (B, P), (B, P)
        cache = KVCache.init(cfg, batch=B, length=C)
        logits, cache = build()(tokens, positions, cache=cache)
        return logits[:, -1], cache.k, cache.v, cache.positions, cache.index

    def decode(token, position, k, v, cache_positions, index):
        cache = KVCache(k, v, cache_positions, index)
        logits, cache = build()(token[:, None], position[:, None], cache=cache)
        return logits[:, 0], cache.k, cache.v, cache.positions, cache.index

    i32 = jnp.int32
    k_shape = (cfg.n_layers, B, cfg.kv_heads, C, cfg.head_dim)  # KVCache.init's layouts
    v_shape = (cfg.n_layers, B, cfg.kv_heads, cfg.head_dim, C)
    cdt = jnp.dtype(cfg.compute_dtype)
    kw = {} if platforms is None else {"platforms": platforms}
    pre = jax.export.export(jax.jit(prefill), **kw)(
        jax.ShapeDtypeStruct((B, P), i32), jax.ShapeDtypeStruct((B, P), i32))
    dec = jax.export.export(jax.jit(decode), **kw)(
        jax.ShapeDtypeStruct((B,), i32), jax.ShapeDtypeStruct((B,), i32),
        jax.ShapeDtypeStruct(k_shape, cdt), jax.ShapeDtypeStruct(v_shape, cdt),
        jax.ShapeDtypeStruct((B, C), i32), jax.ShapeDtypeStruct((), i32))
    meta = {"format": FORMAT, "batch": B, "prompt_window": P, "cache_slots": C, "max_seq_len": S,
            "vocab_size": cfg.vocab_size, "quantize": quantize or "none", "platforms": list(pre.platforms),
            "tokenizer": tokenizer_json, **chat_meta(tokenizer_json)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez(f, prefill=np.frombuffer(pre.serialize(), np.uint8), decode=np.frombuffer(dec.serialize(), np.uint8),
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
    return out


def chat_meta(tokenizer_json: str | None) -> dict:
    """`{"chat": ...}` for the artifact's meta: each role's header and end-of-turn text, the generation
    prompt, stop ids and stop strings of the tokenizer's chat template (jaxlm's ChatML, or plain text
    for a model without reserved chat tokens), read off `ChatTemplate.segments` so the template has
    one definition. An imported model's Jinja template is not per-message scaffold text:
    `{"chat_unsupported": reason}` instead."""
    if tokenizer_json is None:
        return {}
    from model.chat_template import ROLES, ChatTemplate
    from model.tokenizer import tokenizer_from_json

    template = ChatTemplate(tokenizer_from_json(tokenizer_json))
    if template.kind == "jinja":
        return {"chat_unsupported": "the model's chat template is an imported Hugging Face (Jinja) template, "
                                    "which the on-device chat does not render; use python -m infer chat"}
    roles, prompt = {}, None
    for role in ROLES:
        turn = template.segments([{"role": role, "content": "x"}], add_generation_prompt=False)
        with_prompt = template.segments([{"role": role, "content": "x"}], add_generation_prompt=True)
        assert [s.message for s in turn] == [None, 0, None], turn  # header, content, end of turn
        roles[role] = {"header": turn[0].text, "end": turn[2].text}
        prompt = with_prompt[2].text[len(turn[2].text):]
    return {"chat": {"kind": template.kind, "roles": roles, "generation_prompt": prompt,
                     "stop_ids": list(template.stop_token_ids), "stop_strings": list(template.stop_strings)}}


def export_run(run, out: str | Path, *, step: int | None = None, batch: int = 1,
               quantize: str | None = None, platforms: tuple[str, ...] | None = None) -> Path:
    """Export the latest (or given) checkpoint of a run directory (or a `LoadedModel` already loaded),
    for `platforms` (e.g. ("cpu", "cuda"); default: this machine's)."""
    from model.checkpoint import LoadedModel, load_for_inference

    _, model, tokenizer, _ = run if isinstance(run, LoadedModel) else load_for_inference(run, step)
    return export_model(model, tokenizer.to_json(), out, batch=batch, quantize=quantize, platforms=platforms)
