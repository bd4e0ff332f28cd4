"""Tokenizer classes (model/tokenizer.py): round trips, the char vocabulary contract, BPE, serialization,
and control tokens: reserved chat tokens, Hugging Face added tokens, `encode` never yielding them,
`encode_special` for template scaffolds, and JSON written before any of this loading unchanged."""

import json

import numpy as np
import pytest

from model.tokenizer import EOS_TEXT, BPETokenizer, ByteTokenizer, CharTokenizer, _split_text, tokenizer_from_json
from tests.model.tokenizers import hf_style_bpe

TEXT = "def f(x):\n    return x ** 2  # naïve — ünïcode ✓ 日本語 🙂\n\nclass A:\n    pass\n"
CHAT = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def corpus():
    lines = [f"def fn_{i}(a, b):\n    return a * {i} + b  # ünïcode {i % 7}\n" for i in range(300)]
    return ["".join(lines[i:i + 30]) for i in range(0, 300, 30)]


@pytest.fixture(scope="module")
def bpe(corpus):
    return BPETokenizer.train(corpus, vocab_size=400, progress=False)


@pytest.fixture(scope="module")
def hf_bpe():
    """An imported-style tokenizer (tests/model/tokenizers.py)."""
    return hf_style_bpe(["hello world, [INST] say hi [/INST] fine"] * 20, vocab_size=280)


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


# ---- control tokens ----------------------------------------------------------------------------

def test_default_tokenizers_keep_their_vocabulary_and_ids(corpus, bpe):
    """Recorded runs depend on these: nothing about special tokens changes a default tokenizer."""
    byte = ByteTokenizer()
    assert (byte.vocab_size, byte.eos_id, byte.special_tokens) == (257, 256, {EOS_TEXT: 256})
    assert byte.to_json() == '{"kind": "byte"}'
    char = CharTokenizer.train(["ab\n"])
    assert (char.vocab_size, char.eos_id, char.special_tokens) == (3, None, {})
    assert char.to_json() == '{"kind": "char", "chars": "\\nab"}'
    assert bpe.vocab_size == 400 and bpe.special_tokens == {EOS_TEXT: bpe.eos_id}
    assert bpe.encode(TEXT).tolist() == bpe._tok.encode(TEXT, add_special_tokens=False).ids


@pytest.mark.parametrize("old", [
    '{"kind": "byte"}',
    '{"kind": "char", "chars": "\\n !abc"}',
])
def test_json_written_before_special_tokens_loads_unchanged(old):
    tok = tokenizer_from_json(old)
    assert tok.to_json() == old  # same store key, same checkpoint bytes
    assert tok.chat_template is None and tok.bos_token is None
    assert tok.decode(tok.encode("abc !\n")) == "abc !\n"


def test_old_bpe_json_and_the_legacy_checkpoint_tokenizer_load_unchanged(bpe):
    from pathlib import Path

    old = json.dumps({"kind": "bpe", "tokenizer": json.loads(bpe._tok.to_str())})  # the format before
    again = tokenizer_from_json(old)
    assert again.to_json() == old and again.eos_id == bpe.eos_id and again.vocab_size == 400
    assert again.encode(TEXT).tolist() == bpe.encode(TEXT).tolist()
    legacy = (Path(__file__).parents[1] / "fixtures" / "legacy_run" / "tokenizer.json").read_text()
    assert tokenizer_from_json(legacy).to_json() == legacy


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_reserved_chat_tokens_append_ids_and_round_trip_json(kind, bpe):
    base = {"byte": ByteTokenizer(), "char": CharTokenizer.train([TEXT]), "bpe": bpe}[kind]
    tok = base.with_special_tokens(CHAT)
    V = base.vocab_size
    assert tok.vocab_size == V + 2 and base.vocab_size == V  # a copy; the base is untouched
    assert tok.special_tokens == {**base.special_tokens, "<|im_start|>": V, "<|im_end|>": V + 1}
    assert tok.encode(TEXT).tolist() == base.encode(TEXT).tolist()  # existing ids unchanged
    assert tok.with_special_tokens(CHAT) is tok  # already reserved: nothing to add
    again = tokenizer_from_json(tok.to_json())
    assert again.to_json() == tok.to_json() and again.special_tokens == tok.special_tokens
    scaffold = "<|im_start|>user\n"
    ids = again.encode_special(scaffold + "<|im_end|>")
    assert ids[0] == V and ids[-1] == V + 1 and again.decode(ids) == scaffold + "<|im_end|>"
    assert again.decode([V + 1, V]) == "<|im_end|><|im_start|>"


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "hf"])
def test_text_never_encodes_to_a_control_token(kind, bpe, hf_bpe):
    """Every control string, pairs of them, halves glued together, with and without surrounding text."""
    base = {"byte": ByteTokenizer(), "char": CharTokenizer.train([TEXT + "<|>[]/_INSTabcdefghijklmnopqrstuvwxyz"]),
            "bpe": bpe, "hf": hf_bpe}[kind]
    tok = base.with_special_tokens(CHAT)
    specials = tok.special_tokens
    control = set(specials.values())
    texts = list(specials)
    texts += [a + b for a in specials for b in specials]
    texts += [a[: len(a) // 2] + b[len(b) // 2:] for a in specials for b in specials]  # halves glued
    texts += [f"x {a} y" for a in specials] + [f"\n{a}\n" for a in specials]
    for text in texts:
        if kind == "char" and not set(text) <= set(tok.chars):
            continue
        ids = tok.encode(text).tolist()
        assert not control & set(ids), (text, ids)
        assert tok.decode(ids) == text
        assert all(not control & set(e.tolist()) for e in tok.encode_batch([text, text + text]))
    # The same strings parsed as a scaffold are exactly their control ids.
    for s, i in specials.items():
        if kind != "char" or set(s) <= set(tok.chars):
            assert tok.encode_special(s).tolist() == [i]


def test_hf_added_tokens_special_or_not_are_control_tokens(hf_bpe):
    specials = hf_bpe.special_tokens
    assert {"<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]", "<|eot|>"} <= set(specials)
    # Hugging Face itself splits non-special added tokens out of text even with encode_special_tokens:
    raw = hf_bpe._tok.encode("[INST] hi", add_special_tokens=False).ids
    assert specials["[INST]"] in raw
    assert specials["[INST]"] not in hf_bpe.encode("[INST] hi").tolist()
    # encode_special honours rstrip: "<|eot|>" absorbs the whitespace after it.
    assert hf_bpe.encode_special("<|eot|>   hi").tolist() == [specials["<|eot|>"]] + hf_bpe.encode("hi").tolist()


def test_chat_template_fields_serialize_and_name_the_eos(hf_bpe):
    tok = hf_bpe.with_chat_template("{{ bos_token }}", bos_token="<s>", eos_token="</s>")
    assert hf_bpe.chat_template is None and hf_bpe.eos_id is None  # the original is untouched
    assert tok.eos_id == tok.special_tokens["</s>"] and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    again = tokenizer_from_json(tok.to_json())
    assert (again.chat_template, again.bos_token, again.eos_token, again.eos_id) == \
        ("{{ bos_token }}", "<s>", "</s>", tok.eos_id)
    assert again.to_json() == tok.to_json()
    reserved = again.with_special_tokens(["<|new|>"])  # the chat fields travel with the copy
    assert reserved.chat_template == "{{ bos_token }}" and reserved.eos_id == tok.eos_id
    with pytest.raises(ValueError, match="eos_token '<nope>' is not a special or added token"):
        hf_bpe.with_chat_template("x", eos_token="<nope>")


def test_bad_special_tokens_and_json_fields_are_one_line_errors():
    with pytest.raises(ValueError, match="non-empty strings"):
        ByteTokenizer().with_special_tokens(["<a>", ""])
    with pytest.raises(ValueError, match="non-empty strings"):
        ByteTokenizer().with_special_tokens("<a>")
    with pytest.raises(ValueError, match="special_tokens"):
        tokenizer_from_json('{"kind": "byte", "special_tokens": "<a>"}')
    with pytest.raises(ValueError, match="chat_template"):
        tokenizer_from_json('{"kind": "byte", "chat_template": 3}')
