"""Corpora: where the text comes from (`data.source`).

    corpus = load_corpus(cfg.data)   # Corpus(documents, fingerprint, description)

- `python_stdlib` (default): the running interpreter's standard library `.py` files; nothing to download.
- `files`: a file, a directory (recursively) or a glob.
- `url`: downloaded once into `data.cache_dir`, optionally checked against `data.sha256`.
- `tinyshakespeare`: Karpathy's tiny Shakespeare (one document), from `data.path` or downloaded.

Empty documents are dropped (they would add nothing but a separator), and `data.max_chars > 0` caps any
corpus: whole documents first, then the last one cut. The fingerprint is a sha256 over the documents
in order, so it changes when the content, the order or the document boundaries change.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
import tempfile
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from train.config import ConfigError, DataConfig

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# The stdlib document order is a fixed shuffle (not the run seed): every run over the same
# interpreter sees the same corpus, and the validation tail is a mix of modules, not just `zoneinfo`.
_STDLIB_SHUFFLE_SEED = 20240601
# Directory names under the stdlib that hold test suites or installed packages, not library code.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    documents: list[str]
    fingerprint: str  # sha256 over the documents, in order
    description: str  # one line for logs and the run manifest

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the documents `cfg.source` names. User mistakes raise `ConfigError`."""
    if cfg.source == "python_stdlib":
        docs, desc = _python_stdlib(cfg.max_chars)
    elif cfg.source == "files":
        docs, desc = _files(cfg.path)
    elif cfg.source == "url":
        if not cfg.url:
            raise ConfigError("data.url is required with data.source=url")
        path = download(cfg.url, cfg.cache_dir, cfg.sha256)
        docs, desc = [_read_text(path, f"data.url={cfg.url!r}")], f"url {cfg.url}"
    elif cfg.source == "tinyshakespeare":
        docs, desc = _tinyshakespeare(cfg)
    else:
        raise ConfigError(f"data.source={cfg.source!r} is not one of python_stdlib, tinyshakespeare, files, url")
    docs = [d for d in docs if d]
    if cfg.max_chars > 0:
        docs = truncate(docs, cfg.max_chars)
        desc += f", first {cfg.max_chars:,} chars"
    if not docs:
        raise ConfigError(f"data.source={cfg.source!r} gave an empty corpus")
    return Corpus(docs, fingerprint(docs), desc)


def fingerprint(documents: list[str]) -> str:
    """sha256 over (length, UTF-8 bytes) of each document in order: boundaries count, not just text."""
    h = hashlib.sha256()
    for d in documents:
        b = d.encode("utf-8", errors="surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def truncate(documents: list[str], max_chars: int) -> list[str]:
    """The leading documents holding `max_chars` characters in all; the last one cut to fit."""
    out, left = [], max_chars
    for d in documents:
        if left <= 0:
            break
        out.append(d[:left])
        left -= len(out[-1])
    return out


# ---- python_stdlib -----------------------------------------------------------------------

def stdlib_files() -> tuple[Path, list[Path]]:
    """(stdlib root, its `.py` files sorted by relative path), without site-packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune: site-packages is huge
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _python_stdlib(max_chars: int = 0) -> tuple[list[str], str]:
    root, files = stdlib_files()
    order = np.random.default_rng(_STDLIB_SHUFFLE_SEED).permutation(len(files))
    docs, n_chars = [], 0
    for i in order:
        if 0 < max_chars <= n_chars:  # enough read: the caller truncates to max_chars exactly
            break
        try:
            docs.append(files[i].read_text(encoding="utf-8", errors="replace"))
        except OSError:  # unreadable (permissions, broken link): not part of the corpus
            continue
        n_chars += len(docs[-1])
    version = ".".join(map(str, sys.version_info[:3]))
    return docs, f"python_stdlib (Python {version}, {len(docs)} of {len(files)} files under {root})"


# ---- files ------------------------------------------------------------------------------

def _files(pattern: str) -> tuple[list[str], str]:
    if not pattern:
        raise ConfigError("data.path is required with data.source=files (a file, directory or glob)")
    expanded = os.path.expanduser(pattern)
    p = Path(expanded)
    if p.is_file():
        return [_read_text(p, f"data.path={pattern!r}")], f"file {p}"
    if p.is_dir():
        # Hidden entries (.git, .venv, editor files) are skipped: they are not the user's text.
        paths = sorted(
            (f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)),
            key=lambda f: f.relative_to(p).as_posix(),
        )
        what = f"directory {p}"
    elif glob.has_magic(expanded):
        paths = sorted(Path(f) for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        what = f"glob {pattern}"
    else:
        raise ConfigError(f"data.path={pattern!r} does not exist (a file, directory or glob is allowed)")
    if not paths:
        raise ConfigError(f"data.path={pattern!r} matches no files")
    docs, skipped = [], []
    for f in tqdm(paths, desc="reading files", unit="file", disable=len(paths) < 1000, leave=False):
        try:
            docs.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            skipped.append(f)
        except OSError as e:
            warnings.warn(f"data.path: skipping unreadable file {f}: {e}", stacklevel=2)
    if skipped:
        warnings.warn(
            f"data.path: skipped {len(skipped)} file(s) that are not UTF-8 text, e.g. {skipped[0]}", stacklevel=2
        )
    if not docs:
        raise ConfigError(f"data.path={pattern!r} holds no UTF-8 text files")
    return docs, f"{what} ({len(docs)} files)"


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None


# ---- url / tinyshakespeare -------------------------------------------------------------

def download(url: str, cache_dir: str, sha256: str = "") -> Path:
    """The cached copy of `url` in `cache_dir`, downloading it first if absent.

    The download goes to a temporary file that is renamed into place only once complete (and, with
    `sha256`, verified), so an interrupted or corrupt download never looks cached. A cached file that
    fails the checksum is removed and downloaded again.
    """
    cache = Path(os.path.expanduser(cache_dir))
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    target = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if target.is_file():
        if not sha256 or file_sha256(target) == sha256.lower():
            return target
        target.unlink()  # stale or corrupt: fetch a fresh copy
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir={cache_dir!r} cannot be created: {e.strerror}") from None
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}", leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        actual = h.hexdigest()
        if sha256 and actual != sha256.lower():
            raise ConfigError(f"data.sha256 mismatch for {url}: expected {sha256.lower()}, got {actual}")
        os.replace(tmp, target)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError: a malformed URL
        raise ConfigError(f"could not download {url}: {getattr(e, 'reason', None) or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _tinyshakespeare(cfg: DataConfig) -> tuple[list[str], str]:
    if cfg.path:
        p = Path(os.path.expanduser(cfg.path))
        if not p.is_file():
            raise ConfigError(f"data.path={cfg.path!r} does not exist (a local copy of tiny Shakespeare)")
        actual = file_sha256(p)
        if actual != TINYSHAKESPEARE_SHA256:
            raise ConfigError(
                f"data.path={cfg.path!r} is not tiny Shakespeare: sha256 {actual}, expected {TINYSHAKESPEARE_SHA256}"
            )
    else:
        p = download(TINYSHAKESPEARE_URL, cfg.cache_dir, TINYSHAKESPEARE_SHA256)
    return [_read_text(p, "tinyshakespeare")], f"tinyshakespeare ({p})"
