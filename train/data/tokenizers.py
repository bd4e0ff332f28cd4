"""Fitting a run's tokenizer to its corpus and encoding the corpus into one token stream.

The tokenizer classes and their serialization live with the model (model/tokenizer.py): a checkpoint
carries its tokenizer, and inference never imports the trainer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from model.config import ConfigError
from model.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer
from train.config import DataConfig
from train.data.store import token_dtype


def leading_share(documents: Sequence[str], fraction: float) -> list[str]:
    """The first `fraction` of the corpus's characters, as documents (the last one cut): BPE merges
    are learned from the training part only, so the validation text stays unseen. (The char
    tokenizer, like nanoGPT's, takes its alphabet from the whole text.)"""
    budget = int(sum(len(d) for d in documents) * fraction)
    out = []
    for d in documents:
        if budget <= 0:
            break
        out.append(d[:budget])
        budget -= len(d)
    return out


def build_tokenizer(cfg: DataConfig, documents: list[str], progress: bool = True) -> Tokenizer:
    """The tokenizer `cfg.tokenizer` names: fixed (byte), or fit to `documents` (char, bpe), or loaded
    from `cfg.tokenizer_path` (bpe)."""
    if cfg.tokenizer_path and cfg.tokenizer != "bpe":
        raise ConfigError(
            f"data.tokenizer_path is only used with data.tokenizer=bpe (got data.tokenizer={cfg.tokenizer!r})"
        )
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer == "char":
        return CharTokenizer.train(documents)
    if cfg.tokenizer == "bpe":
        if cfg.tokenizer_path:
            try:
                return BPETokenizer.load(cfg.tokenizer_path)
            except ValueError as e:
                raise ConfigError(f"data.tokenizer_path: {e}") from None
        return BPETokenizer.train(leading_share(documents, 1.0 - cfg.val_fraction), cfg.bpe_vocab_size,
                                  progress=progress)
    raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} is not one of byte, char, bpe")


def encode_documents(
    tokenizer: Tokenizer, documents: Sequence[str], progress: bool = True, batch_chars: int = 1 << 22
) -> np.ndarray:
    """The token stream of `documents` joined with EOS (when the tokenizer has one), as
    `token_dtype(vocab_size)`[N]. Documents are encoded in batches of about `batch_chars` characters."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype=dtype)
    parts: list[np.ndarray] = []
    total_chars = sum(len(d) for d in documents)
    bar = tqdm(total=total_chars, unit="char", unit_scale=True, desc=f"tokenizing ({tokenizer.kind})",
               disable=not progress or total_chars < batch_chars, leave=False)
    start = 0
    while start < len(documents):
        stop, size = start, 0
        while stop < len(documents) and (stop == start or size + len(documents[stop]) <= batch_chars):
            size += len(documents[stop])
            stop += 1
        for i, ids in enumerate(tokenizer.encode_batch(documents[start:stop]), start):
            if i > 0 and eos is not None:
                parts.append(eos)
            parts.append(ids.astype(dtype, copy=False))  # stored narrow: a large corpus stays small
        bar.update(size)
        start = stop
    bar.close()
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)
