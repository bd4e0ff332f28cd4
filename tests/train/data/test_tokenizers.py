"""Fitting and loading a run's tokenizer (build_tokenizer) and encoding documents for the token store.
The tokenizer classes themselves are tested in tests/model/test_tokenizer.py."""

import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from model.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer
from train.data.tokenizers import build_tokenizer, encode_documents

TEXT = "def f(x):\n    return x ** 2  # naïve — ünïcode ✓ 日本語 🙂\n\nclass A:\n    pass\n"


@pytest.fixture(scope="module")
def corpus():
    lines = [f"def fn_{i}(a, b):\n    return a * {i} + b  # ünïcode {i % 7}\n" for i in range(300)]
    return ["".join(lines[i:i + 30]) for i in range(0, 300, 30)]


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPETokenizer.train(corpus, vocab_size=400, progress=False)


def test_bpe_loaded_from_saved_tokenizer_json(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe._tok.save(str(path))
    loaded = build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(path)), documents=[])
    assert loaded.vocab_size == bpe.vocab_size and loaded.eos_id == bpe.eos_id
    assert np.array_equal(loaded.encode(TEXT), bpe.encode(TEXT))
    assert loaded.decode(loaded.encode(TEXT)) == TEXT


def test_bpe_missing_or_invalid_tokenizer_path_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.tokenizer_path"):
        build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(tmp_path / "nope.json")), [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        build_tokenizer(DataConfig(tokenizer="bpe", tokenizer_path=str(bad)), [])
    with pytest.raises(ConfigError, match="only used with data.tokenizer=bpe"):
        build_tokenizer(DataConfig(tokenizer="byte", tokenizer_path=str(bad)), [])


def test_build_tokenizer_trains_bpe_with_configured_vocab(corpus):
    tok = build_tokenizer(DataConfig(tokenizer="bpe", bpe_vocab_size=300), corpus, progress=False)
    assert tok.kind == "bpe" and tok.vocab_size == 300


def test_encode_documents_joins_with_eos_when_the_tokenizer_has_one():
    docs = ["ab", "c", "de"]
    ids = encode_documents(ByteTokenizer(), docs, progress=False)
    assert ids.dtype == np.uint16
    assert ids.tolist() == [97, 98, 256, 99, 256, 100, 101]
    char = CharTokenizer.train(docs)
    assert encode_documents(char, docs, progress=False).tolist() == char.encode("abcde").tolist()
    # Batching boundaries do not change the stream.
    small = encode_documents(ByteTokenizer(), docs, progress=False, batch_chars=1)
    assert np.array_equal(small, ids)


def test_bpe_learns_merges_from_the_training_share_only():
    from train.data.tokenizers import leading_share

    docs = ["aaaa", "bbbb", "cccc", "dddd", "eeee"]
    assert leading_share(docs, 0.5) == ["aaaa", "bbbb", "cc"]
    assert leading_share(docs, 1.0) == docs
