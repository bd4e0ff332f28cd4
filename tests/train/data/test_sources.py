"""Corpora: the stdlib default, local files, URL downloads with checksums, tiny Shakespeare."""

import hashlib
import warnings

import pytest

from train.config import ConfigError, DataConfig
from train.data.sources import TINYSHAKESPEARE_SHA256, fingerprint, load_corpus, stdlib_files


def test_stdlib_corpus_is_found_without_tests_or_site_packages():
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert "json/__init__.py" in rel and "os.py" in rel
    assert rel == sorted(rel)
    for r in rel:
        parts = set(r.split("/")[:-1])
        assert not parts & {"test", "tests", "idle_test", "site-packages"}, r


def test_stdlib_corpus_is_deterministic_and_capped_by_max_chars():
    cfg = DataConfig(source="python_stdlib", max_chars=50_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a.documents == b.documents and a.fingerprint == b.fingerprint
    assert a.n_chars == 50_000 and len(a.documents) >= 1
    assert "python_stdlib" in a.description
    assert a.documents[:1] != [] and all(a.documents)  # no empty documents
    bigger = load_corpus(DataConfig(source="python_stdlib", max_chars=80_000))
    assert bigger.n_chars == 80_000 and bigger.fingerprint != a.fingerprint
    # The cap keeps whole documents and cuts only the last one.
    assert bigger.documents[: len(a.documents) - 1] == a.documents[:-1]


def test_fingerprint_depends_on_content_order_and_boundaries():
    assert fingerprint(["ab", "c"]) == fingerprint(["ab", "c"])
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    assert fingerprint(["ab", "c"]) != fingerprint(["c", "ab"])


def test_files_source_reads_a_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello ✓\n", encoding="utf-8")
    c = load_corpus(DataConfig(source="files", path=str(f)))
    assert c.documents == ["hello ✓\n"]


def test_files_source_reads_a_directory_sorted_recursively_skipping_binary(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zz")
    (tmp_path / "a.txt").write_text("aa")
    (tmp_path / "b" / "m.py").write_text("mm")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    with pytest.warns(UserWarning, match="not UTF-8"):
        c = load_corpus(DataConfig(source="files", path=str(tmp_path)))
    assert c.documents == ["aa", "mm", "zz"]  # a.txt, b/m.py, b/z.txt


def test_files_source_reads_a_glob(tmp_path):
    for name, text in [("x1.txt", "one"), ("x2.txt", "two"), ("y.md", "no")]:
        (tmp_path / name).write_text(text)
    c = load_corpus(DataConfig(source="files", path=str(tmp_path / "x*.txt")))
    assert c.documents == ["one", "two"]


def test_files_source_missing_path_or_empty_glob_is_config_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_corpus(DataConfig(source="files", path=missing))
    assert missing in str(e.value)
    with pytest.raises(ConfigError, match="matches no files"):
        load_corpus(DataConfig(source="files", path=str(tmp_path / "*.txt")))
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xff")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_corpus(DataConfig(source="files", path=str(binary)))


def _served_file(tmp_path, text="downloaded text ✓\n"):
    src = tmp_path / "served" / "input.txt"
    src.parent.mkdir()
    src.write_text(text, encoding="utf-8")
    return src, hashlib.sha256(src.read_bytes()).hexdigest()


def test_url_source_downloads_once_into_the_cache(tmp_path):
    src, sha = _served_file(tmp_path)
    cache = tmp_path / "cache"
    cfg = DataConfig(source="url", url=src.as_uri(), sha256=sha, cache_dir=str(cache))
    c = load_corpus(cfg)
    assert c.documents == ["downloaded text ✓\n"]
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]  # one file, no temp left
    src.unlink()  # the source is gone: the cached copy is used, no network
    assert load_corpus(cfg).fingerprint == c.fingerprint


def test_url_source_bad_checksum_is_config_error_and_nothing_is_cached(tmp_path):
    src, sha = _served_file(tmp_path)
    cache = tmp_path / "cache"
    wrong = "0" * 64
    with pytest.raises(ConfigError) as e:
        load_corpus(DataConfig(source="url", url=src.as_uri(), sha256=wrong, cache_dir=str(cache)))
    assert wrong in str(e.value) and sha in str(e.value)
    assert list(cache.iterdir()) == []


def test_url_source_unreachable_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="could not download"):
        load_corpus(DataConfig(source="url", url=(tmp_path / "missing.txt").as_uri(), cache_dir=str(tmp_path)))


def test_tinyshakespeare_local_copy_with_wrong_checksum_is_config_error(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    with pytest.raises(ConfigError, match=TINYSHAKESPEARE_SHA256):
        load_corpus(DataConfig(source="tinyshakespeare", path=str(fake)))
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(DataConfig(source="tinyshakespeare", path=str(tmp_path / "none.txt")))


def test_dangling_link_in_directory_is_ignored(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # not a file: skipped silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(DataConfig(source="files", path=str(tmp_path))).documents == ["fine"]
