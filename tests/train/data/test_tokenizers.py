"""Tokenizers: round trips, the char vocabulary contract, BPE training/loading, serialization."""

import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from model.tokenizer import EOS_TEXT, BPETokenizer, ByteTokenizer, CharTokenizer, _split_text, tokenizer_from_json
from train.data.tokenizers import build_tokenizer, encode_documents

TEXT = "def f(x):\n    return x ** 2  # naïve — ünïcode ✓ 日本語 🙂\n\nclass A:\n    pass\n"


@pytest.fixture(scope="module")
def corpus():
    lines = [f"def fn_{i}(a, b):\n    return a * {i} + b  # ünïcode {i % 7}\n" for i in range(300)]
    return ["".join(lines[i:i + 30]) for i in range(0, 300, 30)]


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPETokenizer.train(corpus, vocab_size=400, progress=False)


def test_byte_round_trips_non_ascii_text():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and tok.vocab_size == 257 and tok.eos_id == 256
    assert list(ids) == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT


def test_byte_decode_shows_eos_and_replaces_broken_utf8():
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 33]) == "hi" + EOS_TEXT + "!"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError, match="257"):
        tok.decode([257])


def test_text_never_encodes_to_eos(bpe):
    for tok in (ByteTokenizer(), bpe):
        assert tok.eos_id not in tok.encode("a " + EOS_TEXT + " b").tolist()


def test_char_vocab_is_sorted_character_set_and_round_trips():
    text = "hello world, Hello!\n"
    tok = CharTokenizer.train([text])
    assert tok.chars == "".join(sorted(set(text)))
    assert tok.vocab_size == len(set(text)) and tok.eos_id is None
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert [tok.chars[i] for i in ids] == list(text)
    assert tok.decode(ids) == text


def test_char_vocab_spans_documents_and_handles_non_ascii():
    tok = CharTokenizer.train(["bä", "a🙂"])
    assert tok.chars == "abä🙂"
    assert tok.decode(tok.encode("🙂äba")) == "🙂äba"


def test_char_unknown_character_is_an_error_naming_it():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")


def test_bpe_trained_on_small_text_round_trips(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert bpe.eos_id is not None
    ids = bpe.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < bpe.vocab_size
    assert bpe.decode(ids) == TEXT
    # Training learned merges: common code compresses well below one token per byte.
    code = "def fn_12(a, b):\n    return a * 12 + b\n"
    assert len(bpe.encode(code)) < len(code.encode()) / 2


def test_bpe_long_text_cut_into_pieces_encodes_identically(bpe):
    text = (TEXT + "x  \ny\n\n z\nw\n") * 200
    pieces = _split_text(text, piece_chars=300)
    assert len(pieces) > 5 and "".join(pieces) == text
    whole = bpe.encode(text)
    assert np.array_equal(np.concatenate([bpe.encode(p) for p in pieces]), whole)
    assert np.array_equal(bpe.encode_batch([text])[0], whole)


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


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_to_json_round_trip_gives_the_same_tokenizer(kind, corpus, bpe):
    tok = {"byte": ByteTokenizer(), "char": CharTokenizer.train(corpus + [TEXT]), "bpe": bpe}[kind]
    again = tokenizer_from_json(tok.to_json())
    assert (again.kind, again.vocab_size, again.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
    assert np.array_equal(again.encode(TEXT), tok.encode(TEXT))
    assert again.decode(tok.encode(TEXT)) == TEXT
    assert again.to_json() == tok.to_json()  # stable: a reloaded run tokenizer keeps its store key


def test_tokenizer_from_json_rejects_garbage():
    with pytest.raises(ValueError, match="kind"):
        tokenizer_from_json("[1, 2]")
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_json('{"kind": "wordpiece"}')


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
