"""From a `DataConfig` to batches: `prepare_data` (corpus -> tokenizer -> token stores) and the Grain
iterators the trainer consumes.

    data = prepare_data(cfg.data, run_dir)                       # tokenizes once; reused on resume
    it = make_train_iterator(data, cfg.data, global_batch_size=32, seed=0,
                             process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)             # {"inputs": int32[B/P, L], "targets": int32[B/P, L]}
    state = it.get_state()       # JSON-serializable; it.set_state(state) resumes exactly here
    for batch in val_batches(data, cfg.data, batch_size=32):     # the whole validation split, once
        ...                      # + "weights": float32[B, L], 0 on padding

Chat data (`data.source` chat_jsonl or stdlib_chat, train/data/sft.py): the splits are packed rows
(`PackedRows`) and every batch also carries "positions", "segment_ids" (int32[B, L]) and "weights" (the
loss mask: 1 on assistant tokens only); the same iterators and shuffling apply, over rows.

Example order. Training example `g` (a global index: step * B + row) is the window at offset
`perm_e[g mod N]` where `e = g // N`, N the number of windows and `perm_e` a permutation that Grain's
index shuffle derives from (seed, epoch). Process p of P takes rows [p*B/P, (p+1)*B/P) of each global
batch, so the global batch at a step does not depend on P, and a saved state (which counts steps)
restores on any process count with the same global batch size.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import grain
import numpy as np

from train.config import CHAT_SOURCES, ConfigError, DataConfig
from train.data import sft
from train.data.sources import load_corpus
from train.data.store import TokenStore, join
from model.tokenizer import Tokenizer, tokenizer_from_json
from train.data.tokenizers import build_tokenizer, encode_documents

STORE_FORMAT = 1  # bump when the stored stream for the same (corpus, tokenizer, split) changes


class Tokens(Protocol):
    """What the iterators read from: a `TokenStore` or an `ArrayTokens`."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArrayTokens:
    """An in-memory token array with the `TokenStore` read interface (notebooks, tests)."""

    def __init__(self, tokens: np.ndarray):
        self.tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        self._digest = hashlib.sha256(self.tokens.tobytes()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.tokens)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.tokens[start:stop]

    def __repr__(self) -> str:
        return f"ArrayTokens(n_tokens={len(self.tokens)}, sha256={self._digest!r})"


@dataclass(frozen=True)
class PreparedData:
    tokenizer: Tokenizer
    train: Tokens
    val: Tokens
    fingerprint: str  # sha256 of the corpus content (see sources.fingerprint)
    stats: dict[str, Any]  # n_documents, n_chars, n_train_tokens, n_val_tokens, source, ...


# ---- preparing the token stores ----------------------------------------------------------

def prepare_data(cfg: DataConfig, run_dir: str | os.PathLike, progress: bool = True, *,
                 tokenizer: Tokenizer | None = None, chat_tokens: bool = True,
                 max_bad_fraction: float = 0.1) -> PreparedData:
    """Load the corpus, build (or reuse) the tokenizer, and tokenize into train/val token stores.

    `tokenizer`: the one to use (fine-tuning: the source model's, train/finetune.py) instead of
    building one; `chat_tokens` and `max_bad_fraction` apply to chat data (`prepare_chat_data`).

    The stream is the documents joined with EOS (when the tokenizer has one); the first
    `1 - val_fraction` of it is train, the rest validation (nanoGPT's split). The tokenizer is saved
    as `<run_dir>/tokenizer.json` and reused from there on resume; the stores (`data.store` or
    `<run_dir>/tokens`, with `train` and `val` inside) are reused when they were made from the same
    corpus, tokenizer and split, so a resumed run does not tokenize again.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.source in CHAT_SOURCES:
        return prepare_chat_data(cfg, run_dir, progress, tokenizer=tokenizer, chat_tokens=chat_tokens,
                                 max_bad_fraction=max_bad_fraction)
    corpus = load_corpus(cfg)
    tokenizer = _run_tokenizer(cfg, corpus.documents, run_dir / "tokenizer.json", progress, given=tokenizer)

    root = cfg.store or str(run_dir / "tokens")
    key = {
        "format": STORE_FORMAT,
        "fingerprint": corpus.fingerprint,
        "tokenizer_sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest(),
        "val_fraction": cfg.val_fraction,
    }
    train = TokenStore.open_matching(join(root, "train"), {**key, "split": "train"})
    val = TokenStore.open_matching(join(root, "val"), {**key, "split": "val"})
    reused = train is not None and val is not None
    if not reused:
        try:
            ids = encode_documents(tokenizer, corpus.documents, progress=progress)  # [N], uint16 or int32
        except ValueError as e:  # a reused char tokenizer meeting a character it has never seen
            raise ConfigError(f"{run_dir / 'tokenizer.json'} cannot encode data.source={cfg.source!r}: {e}; "
                              "use a new run directory for a different corpus") from None
        n_train = int(len(ids) * (1.0 - cfg.val_fraction))
        val = TokenStore.write(join(root, "val"), ids[n_train:], {**key, "split": "val"}, tokenizer.vocab_size)
        train = TokenStore.write(join(root, "train"), ids[:n_train], {**key, "split": "train"}, tokenizer.vocab_size)

    if min(len(train), len(val)) <= cfg.seq_len:
        raise ConfigError(
            f"the corpus gives {len(train):,} train and {len(val):,} validation tokens; each split needs more "
            f"than data.seq_len={cfg.seq_len} (raise data.max_chars or data.val_fraction, or lower data.seq_len)"
        )
    stats = {
        "source": corpus.description,
        "n_documents": len(corpus.documents),
        "n_chars": corpus.n_chars,
        "n_train_tokens": len(train),
        "n_val_tokens": len(val),
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "store": root,
        "store_reused": reused,
    }
    return PreparedData(tokenizer, train, val, corpus.fingerprint, stats)


def prepare_chat_data(cfg: DataConfig, run_dir: Path, progress: bool = True, *, tokenizer: Tokenizer | None = None,
                      chat_tokens: bool = True, max_bad_fraction: float = 0.1) -> PreparedData:
    """Conversations (train/data/sft.py) -> packed train/val rows with loss masks and segments. The
    tokenizer is `tokenizer`, else one learned from the message contents; with `chat_tokens` the
    ChatML control tokens are reserved unless the tokenizer carries its own (imported) template."""
    from model.chat_template import CHAT_TOKENS

    train_path, val_path = sft.chat_files(cfg.source, cfg.path, cfg.cache_dir, progress)
    train = sft.read_chat_jsonl(train_path)
    if val_path is None:
        train, val = sft.split_tail(train, cfg.val_fraction)
    else:
        val = sft.read_chat_jsonl(val_path)

    def build(documents):
        tok = build_tokenizer(cfg, documents, progress=progress)
        return tok.with_special_tokens(CHAT_TOKENS) if chat_tokens and not tok.chat_template else tok

    if tokenizer is not None and chat_tokens and not tokenizer.chat_template:
        tokenizer = tokenizer.with_special_tokens(CHAT_TOKENS)
    documents = sft.conversation_texts([train]) if tokenizer is None else []
    tokenizer = _run_tokenizer(cfg, documents, run_dir / "tokenizer.json", progress, given=tokenizer, build=build)
    train_rows, val_rows, stats = sft.encode_and_pack(tokenizer, train, val, cfg.seq_len, max_bad_fraction, progress)
    files = [train_path] + ([val_path] if val_path is not None else [])
    stats.update(source=f"{cfg.source} ({', '.join(map(str, files))})", tokenizer=tokenizer.kind,
                 vocab_size=tokenizer.vocab_size)
    return PreparedData(tokenizer, train_rows, val_rows, sft.fingerprint_files(files), stats)


def _run_tokenizer(cfg: DataConfig, documents: list[str], path: Path, progress: bool,
                   given: Tokenizer | None = None, build=None) -> Tokenizer:
    """The run's tokenizer: the one saved in the run directory, else `given`, else a new one built
    from `documents` (`build`, default `build_tokenizer`); then saved. A saved one that differs from
    `given` (another fine-tuning source in the same run directory) is an error."""
    if given is not None:
        if path.is_file() and path.read_text() != given.to_json():
            raise ConfigError(f"{path} differs from the tokenizer of finetune.init_from; use a new run directory "
                              "to fine-tune from another model")
        if not path.is_file():
            _write_atomic(path, given.to_json())
        return given
    if path.is_file():
        tokenizer = tokenizer_from_json(path.read_text())
        if tokenizer.kind != cfg.tokenizer:
            raise ConfigError(
                f"data.tokenizer={cfg.tokenizer!r} but this run directory's {path} is {tokenizer.kind!r}; "
                "use a new run directory to change the tokenizer"
            )
        return tokenizer
    tokenizer = (build or (lambda docs: build_tokenizer(cfg, docs, progress=progress)))(documents)
    _write_atomic(path, tokenizer.to_json())
    return tokenizer


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a crash never leaves a truncated tokenizer.json to be reused


# ---- training / periodic-eval iterators ------------------------------------------------

class TokenWindows:
    """Grain random-access source: example i = tokens[i*stride : i*stride + L + 1] as inputs/targets."""

    def __init__(self, tokens: Tokens, seq_len: int, stride: int):
        self.tokens, self.seq_len, self.stride = tokens, seq_len, stride
        self._n = (len(tokens) - 1 - seq_len) // stride + 1 if len(tokens) > seq_len else 0

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = int(i) * self.stride
        w = self.tokens.read(start, start + self.seq_len + 1)  # int32[L+1]
        return {"inputs": w[:-1], "targets": w[1:]}  # int32[L] each

    def __repr__(self) -> str:
        return f"TokenWindows({self.tokens!r}, seq_len={self.seq_len}, stride={self.stride})"


class _ProcessRows(grain.MapDataset):
    """Local example i of process p = global example (i // Bl) * B + p * Bl + i % Bl, Bl = B / P."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent)  # infinite (the parent repeats)

    def _global_index(self, i: int) -> int:
        step, row = divmod(i, self._local)
        return step * self._global + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_index(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._global_index(i) for i in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"_ProcessRows(global_batch={self._global}, local={self._local}, offset={self._offset})"


class _AddWeights:
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {**batch, "weights": np.ones(batch["targets"].shape, np.float32)}  # float32[B, L]


class _CheckedIterDataset(grain.IterDataset):
    """Puts a description of the pipeline into the iterator state and checks it on `set_state`:
    restoring a state saved by a different pipeline (other data, seed, batch size or sampling) is an
    error instead of silently different batches."""

    def __init__(self, parent: grain.IterDataset, description: str, copy_out: bool = False):
        super().__init__(parent)
        self._description = description
        self._copy_out = copy_out

    def __iter__(self) -> grain.DatasetIterator:
        return _CheckedIterator(self._parent.__iter__(), self._description, self._copy_out)

    def __str__(self) -> str:
        return f"_CheckedIterDataset({self._description})"


class _CheckedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, description: str, copy_out: bool):
        super().__init__(parent)
        self._description = description
        self._copy_out = copy_out

    def __next__(self):
        batch = next(self._parent)
        if self._copy_out:
            # Worker batches arrive in shared memory that is freed only when the array is collected;
            # a plain copy frees it now (and no batch still alive at exit leaks a segment).
            batch = {k: np.array(v) for k, v in batch.items()}
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._description, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "grain" not in state:
            raise ValueError("not a jaxlm data iterator state (expected keys 'pipeline' and 'grain')")
        if state.get("pipeline") != self._description:
            raise ValueError(
                "the saved data iterator state is for a different pipeline:\n"
                f"  saved: {state.get('pipeline')}\n  now:   {self._description}"
            )
        self._parent.set_state(state["grain"])


def _seed32(seed: int, purpose: str) -> int:
    """A 32-bit shuffle seed from the run seed. Hashed, because Grain reshuffles epoch e with
    seed + e: plain seeds s and s+1 would replay each other's epochs one epoch apart."""
    return int.from_bytes(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:4], "little")


def _window_iterator(
    tokens: Tokens, seq_len: int, stride: int, global_batch: int, seed: int, purpose: str,
    process_index: int, process_count: int, worker_count: int, with_weights: bool,
) -> grain.DatasetIterator:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch <= 0 or global_batch % process_count:
        raise ConfigError(
            f"the global batch size {global_batch} must be a positive multiple of the process count {process_count}"
        )
    if isinstance(tokens, sft.PackedRows):  # chat data: the examples are the packed rows themselves
        source = tokens
        with_weights = False  # rows carry their loss mask
    else:
        source = TokenWindows(tokens, seq_len, stride)
    if len(source) == 0:
        raise ConfigError(f"{len(tokens)} tokens are too few for one window of data.seq_len={seq_len} (+1) tokens")
    ds = grain.MapDataset.source(source).shuffle(seed=_seed32(seed, purpose)).repeat()  # infinite, per-epoch shuffle
    ds = _ProcessRows(ds, global_batch, process_index, process_count)
    ds = ds.batch(global_batch // process_count, drop_remainder=True)  # int32[B/P, L]
    if with_weights:
        ds = ds.map(_AddWeights())
    # A few batches of read-ahead in threads; more buffers only memory (elements are whole batches).
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if worker_count > 0:
        _prepare_grain_workers()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2))
    description = (f"{purpose} {source!r} global_batch={global_batch} seed={seed} "
                   f"workers={worker_count}")
    return iter(_CheckedIterDataset(it_ds, description, copy_out=worker_count > 0))


def _prepare_grain_workers() -> None:
    # Grain's worker processes read absl flags; outside absl.app.run nobody parsed them, and the
    # workers would die with UnparsedFlagAccessError. (The caller still needs a __main__ guard:
    # workers are started with the 'spawn' method and re-import the main module.)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_train_iterator(
    data: PreparedData, cfg: DataConfig, global_batch_size: int, seed: int,
    process_index: int = 0, process_count: int = 1,
) -> grain.DatasetIterator:
    """An infinite Grain iterator of this process's rows of each global training batch:
    {"inputs": int32[B/P, L], "targets": int32[B/P, L]}, targets = inputs shifted left by one.

    `cfg.sampling="windows"`: every offset of the train stream is an example (nanoGPT's get_batch),
    visited in a fresh random order each epoch. `"packed"`: disjoint chunks (L+1 tokens, stride L, so
    every token is a target once per epoch), shuffled each epoch. Same seed, same batches; the state
    (`get_state()`, JSON-serializable) restores to exactly the next batch, also on another process count.
    """
    stride = 1 if cfg.sampling == "windows" else cfg.seq_len
    return _window_iterator(
        data.train, cfg.seq_len, stride, global_batch_size, seed, f"train-{cfg.sampling}",
        process_index, process_count, cfg.worker_count, with_weights=False,
    )


def eval_sample_iterator(
    data: PreparedData, cfg: DataConfig, batch_size: int, seed: int,
    process_index: int = 0, process_count: int = 1,
) -> grain.DatasetIterator:
    """Random validation windows for the cheap periodic loss estimate (nanoGPT's estimate_loss):
    an infinite iterator of {"inputs", "targets": int32[B/P, L], "weights": float32[B/P, L] (all 1)}.
    Make a new one with the same seed for each estimate to compare steps on the same windows."""
    return _window_iterator(
        data.val, cfg.seq_len, 1, batch_size, seed, "eval-sample",
        process_index, process_count, worker_count=0, with_weights=True,
    )


# ---- the full validation pass ---------------------------------------------------------

def num_val_batches(data: PreparedData, cfg: DataConfig, batch_size: int) -> int:
    """How many batches `val_batches` yields."""
    if isinstance(data.val, sft.PackedRows):
        return math.ceil(len(data.val) / batch_size)
    n_windows = math.ceil((len(data.val) - 1) / cfg.seq_len)
    return math.ceil(n_windows / batch_size)


def val_batches(
    data: PreparedData, cfg: DataConfig, batch_size: int, process_index: int = 0, process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """The whole validation split, once: window k has inputs val[kL : kL+L] and targets
    val[kL+1 : kL+L+1], so every validation token after the first is a target exactly once.
    Yields {"inputs", "targets": int32[B/P, L], "weights": float32[B/P, L]}; the last window and the
    last batch are padded with weight 0, so sum(weights * loss) / sum(weights) is the exact mean loss.
    Process p gets rows [p*B/P, (p+1)*B/P) of each global batch of `batch_size` windows."""
    if batch_size <= 0 or batch_size % process_count:
        raise ConfigError(f"the eval batch size {batch_size} must be a positive multiple of the process count {process_count}")
    if isinstance(data.val, sft.PackedRows):  # every packed row once; the last batch padded with empty rows
        local = batch_size // process_count
        for b in range(num_val_batches(data, cfg, batch_size)):
            rows = b * batch_size + process_index * local + np.arange(local)  # [Bl]
            yield data.val.batch(np.where(rows < len(data.val), rows, -1))
        return
    L = cfg.seq_len
    n = len(data.val)
    local = batch_size // process_count
    for b in range(num_val_batches(data, cfg, batch_size)):
        first = b * batch_size + process_index * local  # this process's first window
        starts = (first + np.arange(local)) * L  # [Bl] offsets into val
        n_real = np.clip(n - 1 - starts, 0, L)  # [Bl] real targets per row
        inputs = np.zeros((local, L), np.int32)
        targets = np.zeros((local, L), np.int32)
        for r in range(local):
            if n_real[r] > 0:
                w = data.val.read(int(starts[r]), int(starts[r] + n_real[r] + 1))  # int32[n_real+1]
                inputs[r, : n_real[r]] = w[:-1]
                targets[r, : n_real[r]] = w[1:]
        weights = (np.arange(L)[None, :] < n_real[:, None]).astype(np.float32)  # [Bl, L]
        yield {"inputs": inputs, "targets": targets, "weights": weights}
