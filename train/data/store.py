"""The token store: one 1-D array of token ids written with tensorstore (zarr), local or on GCS.

    store = TokenStore.write("runs/x/tokens/train", ids, {"fingerprint": ..., ...})
    store = TokenStore.open("runs/x/tokens/train")
    len(store), store.read(0, 1024)          # int32[1024]

Layout of a store at PATH: the zarr array (`PATH/.zarray` and its chunks) plus `PATH/jaxlm.json`, which
holds the metadata (n_tokens, dtype and whatever the writer passed) and is written last: it is the
completion marker. A store without it is half-written and is never opened.

Ids are stored as uint16 when every id fits (vocab <= 65535), else int32; reads are always int32.
Stores under `IN_MEMORY_BYTES` are read into memory once, so random windows cost a slice, not an I/O.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

from train.config import ConfigError

META_KEY = "jaxlm.json"
CHUNK_TOKENS = 1 << 20  # 2 MiB of uint16 per chunk: few objects on GCS, cheap partial reads
IN_MEMORY_BYTES = 1 << 30


def token_dtype(vocab_size: int) -> np.dtype:
    """The storage dtype for ids below `vocab_size`: uint16 up to 65535 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def kvstore_spec(path: str) -> dict[str, Any]:
    """The tensorstore kvstore for a local path or `gs://bucket/path` (a directory: trailing '/')."""
    if path.startswith("gs://"):
        bucket, _, prefix = path[len("gs://"):].partition("/")
        if not bucket:
            raise ConfigError(f"data.store={path!r}: a GCS store must look like gs://bucket/path")
        return {"driver": "gcs", "bucket": bucket, "path": prefix.rstrip("/") + "/" if prefix else ""}
    return {"driver": "file", "path": os.path.abspath(os.path.expanduser(path)) + "/"}


def join(path: str, name: str) -> str:
    """`path/name` for local paths and gs:// URLs alike."""
    return path.rstrip("/") + "/" + name


def _context() -> ts.Context:
    # A bounded chunk cache, so reading windows from a large (not in-memory) store doesn't refetch.
    return ts.Context({"cache_pool": {"total_bytes_limit": 256 << 20}})


def read_meta(path: str) -> dict[str, Any] | None:
    """The metadata of a complete store at `path`, or None if there is none (or it is half-written)."""
    kv = ts.KvStore.open(kvstore_spec(path)).result()
    r = kv.read(META_KEY).result()
    if r.state != "value":
        return None
    return json.loads(bytes(r.value))


class TokenStore:
    """A complete token store: `len()`, `read(start, stop) -> int32[stop - start]`."""

    def __init__(self, path: str, meta: dict[str, Any]):
        self.path = path
        self.meta = meta
        self._n = int(meta["n_tokens"])
        self._array = ts.open(
            {"driver": "zarr", "kvstore": kvstore_spec(path)}, open=True, read=True, context=_context()
        ).result()
        if self._array.shape != (self._n,):
            raise ValueError(f"token store {path}: array shape {self._array.shape} != n_tokens {self._n}")
        self._memory: np.ndarray | None = None
        if self._n * self._array.dtype.numpy_dtype.itemsize < IN_MEMORY_BYTES:
            self._memory = np.asarray(self._array.read().result())  # stored dtype; widened per read

    @classmethod
    def open(cls, path: str) -> "TokenStore":
        """Open a complete store; FileNotFoundError if `path` holds none (or only a half-written one)."""
        meta = read_meta(path)
        if meta is None:
            raise FileNotFoundError(f"no complete token store at {path} (missing {META_KEY})")
        return cls(path, meta)

    @classmethod
    def open_matching(cls, path: str, expected: dict[str, Any]) -> "TokenStore | None":
        """The complete store at `path` if its metadata has every key/value of `expected`, else None
        (absent, half-written, or made from other data / another tokenizer)."""
        meta = read_meta(path)
        if meta is None or any(meta.get(k) != v for k, v in expected.items()):
            return None
        return cls(path, meta)

    @classmethod
    def write(cls, path: str, tokens: np.ndarray, meta: dict[str, Any], vocab_size: int) -> "TokenStore":
        """Write `tokens` (1-D) to a fresh store at `path`, replacing whatever is there, then `meta`."""
        tokens = np.asarray(tokens).reshape(-1)
        dtype = token_dtype(vocab_size)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"token ids must be in [0, {vocab_size})")
        kv = ts.KvStore.open(kvstore_spec(path)).result()
        # First: a crash from here on leaves a store that is not complete. (delete_existing below
        # would remove it too, but only once the new array is created.)
        kv.delete_range(ts.KvStore.KeyRange(META_KEY, META_KEY + "\0")).result()
        # zarr needs a positive chunk size, also for an empty array.
        chunk = max(1, min(CHUNK_TOKENS, tokens.size))
        array = ts.open(
            {
                "driver": "zarr",
                "kvstore": kvstore_spec(path),
                "metadata": {"shape": [tokens.size], "chunks": [chunk], "dtype": dtype.newbyteorder("<").str},
            },
            create=True, delete_existing=True, context=_context(),
        ).result()
        if tokens.size:
            array.write(tokens.astype(dtype, copy=False)).result()
        full = {**meta, "n_tokens": int(tokens.size), "dtype": dtype.name, "vocab_size": int(vocab_size)}
        kv.write(META_KEY, json.dumps(full, indent=1).encode()).result()
        return cls(path, full)

    def __len__(self) -> int:
        return self._n

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int32[stop - start]."""
        if not 0 <= start <= stop <= self._n:
            raise IndexError(f"read({start}, {stop}) outside the token store's [0, {self._n})")
        if self._memory is not None:
            return self._memory[start:stop].astype(np.int32)
        return np.asarray(self._array[start:stop].read().result()).astype(np.int32)

    def __repr__(self) -> str:
        # Content, not location: the iterator-state check compares it, and a run directory that was
        # moved or copied must still restore.
        m = self.meta
        return (f"TokenStore(n_tokens={self._n}, split={m.get('split')!r}, "
                f"fingerprint={str(m.get('fingerprint', ''))[:16]!r}, tokenizer={str(m.get('tokenizer_sha256', ''))[:16]!r})")

    def __reduce__(self):
        # Grain worker processes reopen the store from its path instead of pickling its tokens.
        return (TokenStore, (self.path, self.meta))
