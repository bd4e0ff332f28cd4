"""The data pipeline: prepare_data (split, reuse on resume) and the Grain iterators (determinism,
resume, multi-process sharding, packing, the exact validation pass)."""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from train.config import ConfigError, DataConfig
from train.data import (
    ArrayTokens,
    ByteTokenizer,
    PreparedData,
    encode_documents,
    eval_sample_iterator,
    make_train_iterator,
    num_val_batches,
    prepare_data,
    tokenizer_from_json,
    val_batches,
)
from train.data.sources import TINYSHAKESPEARE_SHA256, file_sha256
from train.data.store import META_KEY
from tests.train.data.test_store import read_all

L = 8


def counting_data(n_train: int = 203, n_val: int = 61) -> PreparedData:
    """Token i has value i, so a window tells where it came from."""
    train = ArrayTokens(np.arange(n_train))
    val = ArrayTokens(np.arange(n_val) + 10_000)
    return PreparedData(ByteTokenizer(), train, val, "counting", {})


def cfg_for(**kw) -> DataConfig:
    return DataConfig(seq_len=L, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def starts(batches) -> list[int]:
    return [int(row[0]) for b in batches for row in b["inputs"]]


# ---- prepare_data -------------------------------------------------------------------------

@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(6):
        (d / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox ✓ " * (20 + i))
    return d


def test_prepare_data_splits_the_eos_joined_stream_like_nanogpt(tmp_path, text_dir):
    cfg = cfg_for(source="files", path=str(text_dir))
    data = prepare_data(cfg, tmp_path / "run", progress=False)
    docs = [p.read_text() for p in sorted(text_dir.iterdir())]
    stream = encode_documents(ByteTokenizer(), docs, progress=False).astype(np.int32)
    n_train = int(len(stream) * 0.9)
    assert np.array_equal(read_all(data.train), stream[:n_train])
    assert np.array_equal(read_all(data.val), stream[n_train:])
    assert data.stats["n_train_tokens"] == n_train and data.stats["n_val_tokens"] == len(stream) - n_train
    assert data.stats["n_documents"] == 6 and data.stats["n_chars"] == sum(map(len, docs))
    assert data.tokenizer.decode(stream).count("<|endoftext|>") == 5
    assert tokenizer_from_json((tmp_path / "run" / "tokenizer.json").read_text()).kind == "byte"
    assert (tmp_path / "run" / "tokens" / "train" / META_KEY).is_file()


def test_prepare_data_reuses_the_store_and_rewrites_when_needed(tmp_path, text_dir):
    cfg, run = cfg_for(source="files", path=str(text_dir)), tmp_path / "run"
    first = prepare_data(cfg, run, progress=False)
    assert not first.stats["store_reused"]
    again = prepare_data(cfg, run, progress=False)
    assert again.stats["store_reused"] and again.fingerprint == first.fingerprint

    (run / "tokens" / "val" / META_KEY).unlink()  # a crash mid-write
    assert not prepare_data(cfg, run, progress=False).stats["store_reused"]

    (text_dir / "doc0.txt").write_text("changed text " * 30)  # other corpus: other fingerprint
    changed = prepare_data(cfg, run, progress=False)
    assert not changed.stats["store_reused"] and changed.fingerprint != first.fingerprint
    assert changed.tokenizer.decode(changed.train.read(0, 13)) == "changed text "


def test_prepare_data_uses_an_explicit_store_location(tmp_path, text_dir):
    store = tmp_path / "shared_tokens"
    prepare_data(cfg_for(source="files", path=str(text_dir), store=str(store)), tmp_path / "run", progress=False)
    assert (store / "train" / META_KEY).is_file() and not (tmp_path / "run" / "tokens").exists()


def test_prepare_data_reuses_the_run_tokenizer(tmp_path, text_dir):
    cfg, run = cfg_for(source="files", path=str(text_dir), tokenizer="char"), tmp_path / "run"
    first = prepare_data(cfg, run, progress=False)
    saved = (run / "tokenizer.json").read_text()
    (text_dir / "extra.txt").write_text("the fox XYZ")  # the saved vocabulary lacks X, Y, Z
    with pytest.raises(ConfigError, match="'X'"):
        prepare_data(cfg, run, progress=False)
    assert (run / "tokenizer.json").read_text() == saved == first.tokenizer.to_json()
    with pytest.raises(ConfigError, match="data.tokenizer='byte'.*'char'"):
        prepare_data(dataclasses.replace(cfg, tokenizer="byte"), run, progress=False)


def test_prepare_data_too_small_corpus_is_config_error(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("just a few characters here")
    with pytest.raises(ConfigError, match="data.seq_len=256"):
        prepare_data(DataConfig(source="files", path=str(f), seq_len=256), tmp_path / "run", progress=False)


def _tinyshakespeare_copy() -> Path | None:
    """A local tiny Shakespeare, if this machine has one: $JAXLM_TINYSHAKESPEARE or the download cache."""
    candidates = [os.environ.get("JAXLM_TINYSHAKESPEARE", "")]
    cache = Path(os.path.expanduser(DataConfig().cache_dir))
    candidates += [str(p) for p in cache.glob("*-input.txt")] if cache.is_dir() else []
    for c in candidates:
        if c and Path(c).is_file() and file_sha256(Path(c)) == TINYSHAKESPEARE_SHA256:
            return Path(c)
    return None


@pytest.mark.skipif(_tinyshakespeare_copy() is None, reason="no local tiny Shakespeare (set JAXLM_TINYSHAKESPEARE)")
def test_tinyshakespeare_char_split_matches_nanogpt(tmp_path):
    cfg = DataConfig(source="tinyshakespeare", path=str(_tinyshakespeare_copy()), tokenizer="char")
    data = prepare_data(cfg, tmp_path / "run", progress=False)
    assert data.tokenizer.vocab_size == 65
    assert (len(data.train), len(data.val)) == (1_003_854, 111_540)


# ---- training iterator -------------------------------------------------------------------

def test_same_seed_same_batches_and_different_seed_different():
    data, cfg = counting_data(), cfg_for()
    a = take(make_train_iterator(data, cfg, 4, seed=0), 6)
    assert same(a, take(make_train_iterator(data, cfg, 4, seed=0), 6))
    assert not same(a, take(make_train_iterator(data, cfg, 4, seed=1), 6))


def test_batches_are_windows_with_targets_shifted_by_one():
    data = counting_data()
    for b in take(make_train_iterator(data, cfg_for(), 4, seed=0), 5):
        assert b["inputs"].shape == b["targets"].shape == (4, L)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        first = b["inputs"][:, :1]
        assert np.array_equal(b["inputs"], first + np.arange(L))  # a contiguous window
        assert np.array_equal(b["targets"], b["inputs"] + 1)  # the next token at every position


def test_windows_visit_every_offset_once_per_epoch_in_a_new_order():
    data = counting_data(n_train=83)  # 83 - 8 = 75 offsets = 25 batches of 3
    got = starts(take(make_train_iterator(data, cfg_for(), 3, seed=5), 50))
    epoch1, epoch2 = got[:75], got[75:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(75))
    assert epoch1 != epoch2


def test_packed_mode_covers_disjoint_chunks_each_epoch():
    data = counting_data(n_train=97)  # (97 - 1) // 8 = 12 chunks
    got = starts(take(make_train_iterator(data, cfg_for(sampling="packed"), 4, seed=0), 6))
    epoch1, epoch2 = got[:12], got[12:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(0, 96, L))
    assert epoch1 != epoch2
    # Chunk targets tile the stream: every token after the first is a target once per epoch.
    targets = np.concatenate([np.arange(s + 1, s + 1 + L) for s in epoch1])
    assert sorted(targets.tolist()) == list(range(1, 97))


@pytest.mark.parametrize("sampling", ["windows", "packed"])
def test_restored_state_gives_the_same_next_batches_across_epochs(sampling):
    data, cfg = counting_data(n_train=45), cfg_for(sampling=sampling)  # epochs of a few batches
    it = make_train_iterator(data, cfg, 4, seed=3)
    take(it, 13)  # past the first epoch boundary in both modes
    state = json.loads(json.dumps(it.get_state()))  # saved in a checkpoint as JSON
    expected = take(it, 12)  # crosses more epoch boundaries
    resumed = make_train_iterator(data, cfg, 4, seed=3)
    resumed.set_state(state)
    assert same(take(resumed, 12), expected)


def test_state_from_another_pipeline_is_refused():
    data, cfg = counting_data(), cfg_for()
    state = make_train_iterator(data, cfg, 4, seed=0).get_state()
    for other in (make_train_iterator(data, cfg, 4, seed=1), make_train_iterator(data, cfg, 8, seed=0),
                  make_train_iterator(counting_data(n_train=300), cfg, 4, seed=0)):
        with pytest.raises(ValueError, match="different pipeline"):
            other.set_state(state)


@pytest.mark.parametrize("sampling", ["windows", "packed"])
def test_two_processes_concatenate_to_the_one_process_global_batch(sampling):
    data, cfg = counting_data(), cfg_for(sampling=sampling)
    whole = take(make_train_iterator(data, cfg, 6, seed=0), 10)
    parts = [take(make_train_iterator(data, cfg, 6, seed=0, process_index=p, process_count=2), 10) for p in (0, 1)]
    for step in range(10):
        assert parts[0][step]["inputs"].shape == (3, L)
        for k in ("inputs", "targets"):
            assert np.array_equal(np.concatenate([parts[0][step][k], parts[1][step][k]]), whole[step][k])


def test_state_saved_with_two_processes_resumes_with_one():
    data, cfg = counting_data(), cfg_for()
    it = make_train_iterator(data, cfg, 6, seed=0, process_index=1, process_count=2)
    take(it, 7)
    single = make_train_iterator(data, cfg, 6, seed=0)
    single.set_state(it.get_state())
    assert same(take(single, 3), take(make_train_iterator(data, cfg, 6, seed=0), 10)[7:])


def test_batch_not_divisible_by_process_count_is_config_error():
    with pytest.raises(ConfigError, match="multiple of the process count 4"):
        make_train_iterator(counting_data(), cfg_for(), 6, seed=0, process_index=0, process_count=4)


def test_stream_shorter_than_a_window_is_config_error():
    with pytest.raises(ConfigError, match="too few"):
        make_train_iterator(counting_data(n_train=8), cfg_for(), 2, seed=0)


# ---- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("n_val,batch", [(61, 3), (57, 7), (2, 4), (9, 1)])
def test_val_batches_cover_every_target_once_with_exact_weights(n_val, batch):
    data, cfg = counting_data(n_val=n_val), cfg_for()
    batches = list(val_batches(data, cfg, batch))
    assert len(batches) == num_val_batches(data, cfg, batch)
    seen = []
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (batch, L)
        assert b["weights"].dtype == np.float32 and set(np.unique(b["weights"])) <= {0.0, 1.0}
        real = b["weights"] == 1
        assert np.array_equal(b["targets"][real], b["inputs"][real] + 1)  # next-token pairs from the stream
        seen += b["targets"][real].tolist()
    val = 10_000 + np.arange(n_val)
    assert seen == val[1:].tolist()  # each target once, in order
    assert batches[-1]["weights"][-1, -1] == 0 or (n_val - 1) % (L * batch) == 0


def test_val_batches_for_two_processes_concatenate_to_the_global_batches():
    data, cfg = counting_data(n_val=61), cfg_for()
    whole = list(val_batches(data, cfg, 4))
    parts = [list(val_batches(data, cfg, 4, process_index=p, process_count=2)) for p in (0, 1)]
    for k in ("inputs", "targets", "weights"):
        assert all(np.array_equal(np.concatenate([a[k], b[k]]), w[k]) for a, b, w in zip(*parts, whole))


def test_eval_sample_iterator_draws_seeded_validation_windows():
    data, cfg = counting_data(n_val=61), cfg_for()
    a = take(eval_sample_iterator(data, cfg, 4, seed=0), 3)
    assert same(a, take(eval_sample_iterator(data, cfg, 4, seed=0), 3))
    assert not same(a, take(eval_sample_iterator(data, cfg, 4, seed=1), 3))
    for b in a:
        assert b["weights"].shape == (4, L) and (b["weights"] == 1).all()
        assert (b["inputs"] >= 10_000).all() and np.array_equal(b["targets"], b["inputs"] + 1)


def test_pipeline_over_a_real_token_store(tmp_path, text_dir):
    cfg = cfg_for(source="files", path=str(text_dir))
    data = prepare_data(cfg, tmp_path / "run", progress=False)
    train = read_all(data.train)
    b = next(make_train_iterator(data, cfg, 4, seed=0))
    for row_in, row_tgt in zip(b["inputs"], b["targets"]):
        hits = [o for o in range(len(train) - L) if np.array_equal(train[o:o + L], row_in)]
        assert hits and np.array_equal(train[hits[0] + 1:hits[0] + 1 + L], row_tgt)
    total = sum(v["weights"].sum() for v in val_batches(data, cfg, 4))
    assert total == len(data.val) - 1


WORKER_SCRIPT = """
import dataclasses, json, sys
import numpy as np
from train.config import DataConfig
from train.data import ArrayTokens, ByteTokenizer, PreparedData, make_train_iterator

def main():
    data = PreparedData(ByteTokenizer(), ArrayTokens(np.arange(203)), ArrayTokens(np.arange(61)), "c", {})
    cfg = DataConfig(seq_len=8)
    ref = make_train_iterator(data, cfg, 4, seed=0)
    want = [next(ref)["inputs"] for _ in range(8)]
    it = make_train_iterator(data, dataclasses.replace(cfg, worker_count=2), 4, seed=0)
    got = [next(it)["inputs"] for _ in range(4)]
    state = json.loads(json.dumps(it.get_state()))
    got += [next(it)["inputs"] for _ in range(4)]
    it.set_state(state)  # rewinds the workers (a fresh iterator would only spawn them again: slow)
    again = [next(it)["inputs"] for _ in range(4)]
    it.close()
    ok = all(np.array_equal(a, b) for a, b in zip(want, got)) and all(
        np.array_equal(a, b) for a, b in zip(want[4:], again))
    print("OK" if ok else "MISMATCH")

if __name__ == "__main__":  # Grain workers are spawned and re-import this module
    main()
"""


def test_grain_worker_processes_give_the_in_process_batches_and_resume(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "workers.py"
    script.write_text(WORKER_SCRIPT)
    root = Path(__file__).resolve().parents[3]  # the repository
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "OK", out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]  # no noisy teardown
