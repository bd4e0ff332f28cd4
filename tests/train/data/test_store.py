"""The tensorstore token store: write, read back as int32, reuse, and never trust a half-written one."""

import pickle

import numpy as np
import pytest

from train.data.store import META_KEY, TokenStore, kvstore_spec


def read_all(store) -> np.ndarray:
    """Every token of a store, int32[len] (the store itself reads only ranges: the pipeline never needs all)."""
    return store.read(0, len(store))


def test_write_then_open_reads_int32_with_narrow_storage(tmp_path):
    ids = (np.arange(5000) * 7) % 300
    path = str(tmp_path / "s")
    TokenStore.write(path, ids, {"fingerprint": "f"}, vocab_size=300)
    store = TokenStore.open(path)
    assert len(store) == 5000 and store.meta["dtype"] == "uint16" and store.meta["n_tokens"] == 5000
    got = store.read(100, 200)
    assert got.dtype == np.int32 and np.array_equal(got, ids[100:200])
    assert np.array_equal(read_all(store), ids)
    with pytest.raises(IndexError):
        store.read(4990, 5001)


def test_large_vocab_is_stored_as_int32(tmp_path):
    ids = np.array([0, 65535, 99_999, 3])
    store = TokenStore.write(str(tmp_path / "s"), ids, {}, vocab_size=100_000)
    assert store.meta["dtype"] == "int32"
    assert np.array_equal(read_all(TokenStore.open(str(tmp_path / "s"))), ids)


def test_out_of_range_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        TokenStore.write(str(tmp_path / "s"), np.array([1, 10]), {}, vocab_size=10)


def test_reuse_only_with_matching_metadata(tmp_path):
    path = str(tmp_path / "s")
    TokenStore.write(path, np.arange(10), {"fingerprint": "abc", "split": "train"}, vocab_size=10)
    assert len(TokenStore.open_matching(path, {"fingerprint": "abc", "split": "train"})) == 10
    assert TokenStore.open_matching(path, {"fingerprint": "other", "split": "train"}) is None
    assert TokenStore.open_matching(str(tmp_path / "absent"), {"fingerprint": "abc"}) is None


def test_half_written_store_is_not_opened_and_is_rewritten(tmp_path):
    path = str(tmp_path / "s")
    TokenStore.write(path, np.arange(10), {"fingerprint": "abc"}, vocab_size=10)
    (tmp_path / "s" / META_KEY).unlink()  # what a crash between the array and the marker leaves
    with pytest.raises(FileNotFoundError, match="no complete token store"):
        TokenStore.open(path)
    assert TokenStore.open_matching(path, {"fingerprint": "abc"}) is None
    TokenStore.write(path, np.arange(5), {"fingerprint": "abc"}, vocab_size=10)
    assert read_all(TokenStore.open(path)).tolist() == [0, 1, 2, 3, 4]


def test_rewrite_replaces_a_longer_store(tmp_path):
    path = str(tmp_path / "s")
    TokenStore.write(path, np.arange(3_000_000) % 7, {}, vocab_size=7)  # several chunks
    TokenStore.write(path, np.array([1, 2, 3]), {}, vocab_size=7)
    assert read_all(TokenStore.open(path)).tolist() == [1, 2, 3]


def test_pickled_store_reopens_from_its_path(tmp_path):
    store = TokenStore.write(str(tmp_path / "s"), np.arange(50), {"fingerprint": "x"}, vocab_size=50)
    again = pickle.loads(pickle.dumps(store))
    assert len(pickle.dumps(store)) < 1000  # the tokens are not in the pickle
    assert np.array_equal(again.read(10, 20), np.arange(10, 20)) and repr(again) == repr(store)


def test_kvstore_spec_local_and_gcs():
    assert kvstore_spec("gs://bucket/a/b") == {"driver": "gcs", "bucket": "bucket", "path": "a/b/"}
    spec = kvstore_spec("/tmp/x")
    assert spec["driver"] == "file" and spec["path"] == "/tmp/x/"
