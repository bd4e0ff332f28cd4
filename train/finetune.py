"""Fine-tuning: start a run from another run's parameters (`finetune.init_from`) instead of random ones.

    finetune.init_from: runs/quickstart          # its latest intact checkpoint
    finetune.init_from: runs/quickstart@400      # a given step (also a run written by `python -m infer import-hf`)

(`model.init_from` is accepted as an alias.) The new run starts at step 0 with a fresh optimizer and
the source's parameters, restored straight onto the run's mesh shardings (each device reads only its
shards). Its data is encoded with the source's tokenizer, which comes with the parameters; for chat
data it is extended with the ChatML control tokens (`finetune.chat_tokens`), and the embedding /
output-head rows of those new ids are the mean of the trained rows (see `grow_vocab`).

The experiment's model section must describe the checkpoint's model: sizes and architecture keys that
differ are one ConfigError naming them with both values. What may differ: `max_seq_len` (RoPE models
only: the rotary context extends at fine-tuning time, learned positions cannot grow), `vocab_size`
(0 = the checkpoint's, grown to fit the tokenizer; never smaller), and how it runs (dropout,
attention/matmul/norm kernels, compute dtype, scan_layers, init_std).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from model.checkpoint import read_checkpoint_meta, restore_params
from model.config import ConfigError, ModelConfig, model_config_from_dict
from model.tokenizer import Tokenizer, tokenizer_from_json
from train.config import CHAT_SOURCES, ExperimentConfig, FinetuneConfig

log = logging.getLogger(__name__)

# (config key named in errors, how to read the value): must equal the checkpoint's
ARCHITECTURE_KEYS = (
    ("d_model", lambda c: c.d_model), ("n_layers", lambda c: c.n_layers), ("n_heads", lambda c: c.n_heads),
    ("n_kv_heads", lambda c: c.kv_heads), ("d_ff", lambda c: c.ff_dim), ("norm", lambda c: c.norm),
    ("norm_eps", lambda c: c.norm_eps), ("positions", lambda c: c.positions), ("rope_theta", lambda c: c.rope_theta),
    ("mlp", lambda c: c.mlp), ("bias", lambda c: c.bias), ("tie_embeddings", lambda c: c.tie_embeddings),
    ("gelu_approximate", lambda c: c.gelu_approximate), ("param_dtype", lambda c: c.param_dtype),
)
# parameters with a vocabulary axis, and which axis it is (model/transformer.py)
VOCAB_AXES = {"embed": 0, "lm_head": 1}


@dataclass(frozen=True)
class Source:
    """The checkpoint a fine-tuning run starts from."""

    spec: str  # finetune.init_from as given
    path: Path
    step: int
    config: dict  # its resolved experiment config
    model: ModelConfig
    tokenizer: Tokenizer


def parse_init_from(spec: str) -> tuple[Path, int | None]:
    """'RUN_DIR' -> (RUN_DIR, None); 'RUN_DIR@STEP' -> (RUN_DIR, STEP)."""
    m = re.fullmatch(r"(.+)@(\d+)", spec)
    return (Path(m.group(1)), int(m.group(2))) if m else (Path(spec), None)


def load_source(cfg: FinetuneConfig) -> Source:
    """Read the checkpoint's config and tokenizer (not its parameters yet); a missing run or step is
    one ConfigError."""
    path, step = parse_init_from(cfg.init_from)
    try:
        step, config, tokenizer_json = read_checkpoint_meta(path, step)
    except FileNotFoundError as e:
        raise ConfigError(f"finetune.init_from={cfg.init_from!r}: {e}") from None
    section = {**config.get("model", {}), "attention": "xla", "matmul": "xla", "norm_impl": "xla"}
    try:
        model = model_config_from_dict(section).validate()
    except ConfigError as e:
        raise ConfigError(f"finetune.init_from={cfg.init_from!r}: its saved model config is not valid: {e}") from None
    log.info("fine-tuning from %s step %d", path, step)
    return Source(cfg.init_from, path, step, config, model, tokenizer_from_json(tokenizer_json))


def data_options(cfg: ExperimentConfig, source: Source | None) -> dict:
    """Keyword arguments of `prepare_data`: the source's tokenizer, and the chat-data options."""
    return dict(tokenizer=None if source is None else source.tokenizer, chat_tokens=cfg.finetune.chat_tokens,
                max_bad_fraction=cfg.finetune.max_bad_fraction)


def check_model_matches(model: ModelConfig, source: Source, vocab_size: int) -> ModelConfig:
    """`model` with vocab_size resolved (`vocab_size`: what the tokenizer needs), or one ConfigError
    naming every key that does not match the checkpoint, with both values."""
    src = source.model
    diffs = [f"model.{name}: checkpoint {get(src)!r}, config {get(model)!r}"
             for name, get in ARCHITECTURE_KEYS if get(src) != get(model)]
    if src.positions == "learned" and model.max_seq_len != src.max_seq_len:
        diffs.append(f"model.max_seq_len: checkpoint {src.max_seq_len}, config {model.max_seq_len} "
                     "(learned positions cannot grow; only RoPE models extend their context when fine-tuned)")
    if model.vocab_size and model.vocab_size < src.vocab_size:
        diffs.append(f"model.vocab_size: checkpoint {src.vocab_size}, config {model.vocab_size} (it may only grow)")
    if diffs:
        raise ConfigError(f"finetune.init_from={source.spec!r}: the model config does not match the checkpoint: "
                          + "; ".join(diffs))
    return dataclasses.replace(model, vocab_size=model.vocab_size or max(src.vocab_size, vocab_size))


def finetune_config(cfg: ExperimentConfig, source: Source | None, tokenizer: Tokenizer) -> ExperimentConfig:
    """The experiment config with its model checked against the source (unchanged without one)."""
    if source is None:
        return cfg
    model = check_model_matches(cfg.model, source, tokenizer.vocab_size)
    if model.max_seq_len > source.model.max_seq_len:
        log.info("extending the rotary context from %d to %d tokens", source.model.max_seq_len, model.max_seq_len)
    return dataclasses.replace(cfg, model=model)


def grow_vocab(name: str, old: jax.Array, new_size: int) -> jax.Array:
    """`old` with its vocabulary axis grown to `new_size`, the new rows (embedding) or columns (output
    head) set to the mean of the trained ones. Why the mean: a new token then starts as an average
    token, so its logit is about the average logit and the model's predictions are nearly unchanged
    at step 0 (a random row can be an outlier the softmax favours); its gradient then moves it away
    (Hewitt, "Initializing new word embeddings for pretrained language models", 2021)."""
    axis = VOCAB_AXES[name]
    mean = jnp.mean(old, axis=axis, keepdims=True)  # (1, D) or (D, 1)
    reps = [1] * old.ndim
    reps[axis] = new_size - old.shape[axis]
    return jnp.concatenate([old, jnp.tile(mean, reps)], axis=axis).astype(old.dtype)


def load_params(source: Source, like):
    """The source's parameters on the layout of `like` (the new run's parameters: arrays with their
    shardings). Orbax restores each parameter straight onto its target sharding; a parameter whose
    vocabulary axis grows is restored replicated at its old size, grown, and laid out as its target."""
    from flax import nnx

    from model.transformer import abstract_model

    _, abstract = abstract_model(source.model)
    saved = nnx.to_pure_dict(abstract)  # the checkpoint's shapes
    grown = {}

    def target(path, s, t):
        name = path[-1].key if len(path) == 1 else None
        if s.shape == t.shape:
            return jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=t.sharding)
        if name not in VOCAB_AXES:  # cannot happen once check_model_matches passed
            raise ConfigError(f"finetune.init_from={source.spec!r}: parameter {jax.tree_util.keystr(path)} has shape "
                              f"{s.shape} in the checkpoint and {t.shape} in this run")
        grown[name] = t
        sharding = (NamedSharding(t.sharding.mesh, PartitionSpec()) if isinstance(t.sharding, NamedSharding)
                    else t.sharding)
        return jax.ShapeDtypeStruct(s.shape, t.dtype, sharding=sharding)

    restore_like = jax.tree_util.tree_map_with_path(target, saved, like)
    params = restore_params(source.path, source.step, restore_like)
    for name, t in grown.items():
        params[name] = jax.jit(lambda x, n=name, v=t.shape[VOCAB_AXES[name]]: grow_vocab(n, x, v),
                               out_shardings=t.sharding)(params[name])
        log.info("grew %s from %d to %d vocabulary entries (new ones: the mean of the trained ones)", name,
                 restore_like[name].shape[VOCAB_AXES[name]], t.shape[VOCAB_AXES[name]])
    return params


def init_state_from(state, source: Source):
    """The new run's TrainState at step 0 with the source's parameters; the optimizer state, made
    for parameters of the same shapes, stays the fresh one."""
    return dataclasses.replace(state, params=load_params(source, state.params))


def is_chat(cfg: ExperimentConfig) -> bool:
    return cfg.data.source in CHAT_SOURCES


def write_chat_samples(model, tokenizer: Tokenizer, path: Path, prompt: str, max_new_tokens: int, seed: int,
                       n: int = 3) -> None:
    """The fine-tuned model's answers to `prompt` as a user turn (rendered with the chat template,
    generation stopped at the end of the assistant's turn), into `path`."""
    from infer.sampler import generate
    from model.chat_template import chat_stop_token_ids, render_chat
    from train.data.instructions import SYSTEM_PROMPT

    prompt = prompt or "Write a function `add(a, b)` that returns the sum of two numbers."
    ids = render_chat(tokenizer, [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}])
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    if max_new_tokens <= 0:
        log.warning("no chat samples: the prompt's %d tokens fill the context of %d", len(ids), model.cfg.max_seq_len)
        return
    stops = chat_stop_token_ids(tokenizer)
    outs = generate(model, [np.asarray(ids, np.int32)] * n, max_new_tokens=max_new_tokens, temperature=0.8,
                    seed=seed, eos_id=tokenizer.eos_id, stop_tokens=stops)
    outs = [o[:-1] if o and (o[-1] in stops or o[-1] == tokenizer.eos_id) else o for o in outs]  # the end of turn
    sep = "\n" + "=" * 72 + "\n"
    path.write_text(sep.join(f"USER: {prompt}\nASSISTANT:\n{tokenizer.decode(o)}" for o in outs) + "\n")
