"""Chat fine-tuning data (train/data/sft.py): the loss sees only assistant tokens, packed examples never
attend to each other, and bad JSONL lines are counted with their line numbers."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model.chat_template import CHAT_TOKENS, ChatTemplate
from model.config import ConfigError, preset
from model.tokenizer import ByteTokenizer
from model.transformer import build_model
from train.config import DataConfig
from train.data import make_train_iterator, num_val_batches, prepare_data, val_batches
from train.data import sft
from train.step import make_loss_fn

TOK = ByteTokenizer().with_special_tokens(CHAT_TOKENS)
CFG = preset("llama-tiny", vocab_size=TOK.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
             max_seq_len=128)


def conversation(i: int, turns: int = 1) -> list[dict]:
    msgs = [{"role": "system", "content": "Be brief."}]
    for t in range(turns):
        msgs += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": f"a{i}{t}"}]
    return msgs


def packed_row(convs, L=128):
    """One packed row of these conversations (all must fit): a batch of B=1."""
    template = ChatTemplate(TOK)
    rows = sft.pack([template.render_with_mask(c) for c in convs], L)
    assert len(rows) == 1
    return {k: jnp.asarray(v) for k, v in rows.batch(np.array([0])).items()}


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def test_packing_gives_each_example_its_segment_positions_and_assistant_mask():
    convs = [conversation(0), conversation(1, turns=2)]
    template = ChatTemplate(TOK)
    (ids0, m0), (ids1, m1) = (template.render_with_mask(c) for c in convs)
    b = {k: np.asarray(v[0]) for k, v in packed_row(convs).items()}
    n0, n1 = len(ids0) - 1, len(ids1) - 1
    np.testing.assert_array_equal(b["segment_ids"][:n0 + n1], [1] * n0 + [2] * n1)
    np.testing.assert_array_equal(b["positions"][:n0 + n1], list(range(n0)) + list(range(n1)))
    np.testing.assert_array_equal(b["inputs"][n0:n0 + n1], ids1[:-1])
    np.testing.assert_array_equal(b["targets"][n0:n0 + n1], ids1[1:])
    np.testing.assert_array_equal(b["weights"][:n0], m0[1:])
    assert not b["weights"][n0 + n1:].any() and not b["segment_ids"][n0 + n1:].any()  # padding
    # the weighted targets are exactly the assistants' contents and their end of turn
    assistant = TOK.decode(b["targets"][b["weights"] > 0].tolist())
    assert "a00" in assistant and "a10" in assistant and "a11" in assistant and "q1" not in assistant


def test_loss_and_gradient_ignore_non_assistant_targets(model):
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    loss_fn = jax.jit(jax.value_and_grad(make_loss_fn(graphdef)))
    batch = packed_row([conversation(0, turns=2), conversation(1)])
    loss, grads = loss_fn(params, batch, None)

    masked = batch["weights"] == 0
    other = jnp.where(masked, (batch["targets"] + 7) % TOK.vocab_size, batch["targets"])  # every user/system target changed
    assert bool((other != batch["targets"]).any())
    loss2, grads2 = loss_fn(params, {**batch, "targets": other}, None)
    assert float(loss2) == float(loss)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), grads, grads2)

    # ...while an assistant target does count (the test would notice a mask that hides everything)
    first = int(jnp.argmax(batch["weights"][0]))
    changed = batch["targets"].at[0, first].set((batch["targets"][0, first] + 1) % TOK.vocab_size)
    assert float(loss_fn(params, {**batch, "targets": changed}, None)[0]) != float(loss)


def test_packed_examples_do_not_attend_across_segments(model):
    a, b = conversation(0), conversation(1, turns=2)
    batch = packed_row([a, b])
    seg = np.asarray(batch["segment_ids"][0])

    def logits(batch, segments=True):
        return np.asarray(model(batch["inputs"], batch["positions"],
                                segment_ids=batch["segment_ids"] if segments else None)[0][0])

    base = logits(batch)
    # changing every token of segment 1 leaves segment 2's logits unchanged
    other = jnp.where(batch["segment_ids"] == 1, (batch["inputs"] + 3) % 256, batch["inputs"])
    changed = logits({**batch, "inputs": other})
    np.testing.assert_array_equal(changed[seg == 2], base[seg == 2])
    assert not np.allclose(changed[seg == 1], base[seg == 1])
    # segment 2 packed equals segment 2 alone (float32: the same sums, other padding)
    alone = packed_row([b])
    n = int((seg == 2).sum())
    np.testing.assert_allclose(logits(alone)[:n], base[seg == 2], rtol=1e-5, atol=1e-5)
    # without segment ids the positions alone would let segment 2 see segment 1 (the mask is needed)
    no_seg = logits({**batch, "inputs": other}, segments=False)
    assert not np.allclose(no_seg[seg == 2], logits(batch, segments=False)[seg == 2])


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_bad_lines_are_counted_with_their_line_numbers(tmp_path, caplog):
    good = [json.dumps({"messages": conversation(i)}) for i in range(20)]
    lines = good[:2] + ["{not json"] + good[2:4] + [""] \
        + [json.dumps({"messages": [{"role": "robot", "content": "hi"}]})] \
        + [json.dumps({"messages": conversation(99)[:2]})] \
        + [json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * 200}]})] \
        + good[4:]
    write_jsonl(tmp_path / "chat.jsonl", lines)
    chat = sft.read_chat_jsonl(tmp_path / "chat.jsonl")
    assert chat.n_lines == len(lines) - 1  # the blank line is not a line of data
    assert [(b.line, b.reason.split(" ")[0]) for b in chat.bad] == [(3, "invalid"), (7, "messages[0].role"),
                                                                    (8, "no")]
    _, too_long = sft.encode_conversations(ChatTemplate(TOK), chat, seq_len=64)
    assert [b.line for b in too_long] == [9] and "tokens, more than data.seq_len + 1 = 65" in too_long[0].reason

    cfg = DataConfig(source="chat_jsonl", path=str(tmp_path / "chat.jsonl"), seq_len=64, val_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="train.data.sft"):
        data = prepare_data(cfg, tmp_path / "run", progress=False, tokenizer=ByteTokenizer(), max_bad_fraction=0.2)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 4 of 24 lines" in warning and "line 3: invalid JSON" in warning and "line 9:" in warning
    assert data.stats["bad_lines"] == 4 and data.tokenizer.vocab_size == TOK.vocab_size  # chat tokens reserved
    assert data.stats["n_train_conversations"] + data.stats["n_val_conversations"] == 20


def test_too_many_bad_lines_is_a_one_line_error(tmp_path):
    lines = [json.dumps({"messages": conversation(i)}) for i in range(8)] + ["oops"] * 2
    write_jsonl(tmp_path / "chat.jsonl", lines)
    cfg = DataConfig(source="chat_jsonl", path=str(tmp_path / "chat.jsonl"), seq_len=64)
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg, tmp_path / "run", progress=False, tokenizer=ByteTokenizer(), max_bad_fraction=0.1)
    msg = str(e.value)
    assert "\n" not in msg and "2 of 10 lines are bad" in msg and "finetune.max_bad_fraction=0.1" in msg
    assert "line 9: invalid JSON" in msg and "line 10: invalid JSON" in msg
    prepare_data(cfg, tmp_path / "run2", progress=False, tokenizer=ByteTokenizer(), max_bad_fraction=0.2)  # allowed


def test_pipeline_batches_carry_masks_and_validation_counts_each_assistant_token_once(tmp_path):
    (tmp_path / "d").mkdir()
    write_jsonl(tmp_path / "d" / "train.jsonl", [json.dumps({"messages": conversation(i, 1 + i % 2)}) for i in range(30)])
    write_jsonl(tmp_path / "d" / "val.jsonl", [json.dumps({"messages": conversation(i)}) for i in range(5)])
    cfg = DataConfig(source="chat_jsonl", path=str(tmp_path / "d"), seq_len=128)
    data = prepare_data(cfg, tmp_path / "run", progress=False)  # no init_from: a byte tokenizer + chat tokens
    assert data.tokenizer.special_tokens.keys() >= set(CHAT_TOKENS)
    batch = next(make_train_iterator(data, cfg, global_batch_size=4, seed=0))
    assert set(batch) == set(sft.ROW_FIELDS) and batch["inputs"].shape == (4, 128)
    batches = list(val_batches(data, cfg, batch_size=4))
    assert len(batches) == num_val_batches(data, cfg, 4)
    assert sum(float(b["weights"].sum()) for b in batches) == data.val.n_target_tokens > 0
