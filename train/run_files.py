"""The files of a run directory besides checkpoints and metrics: the resolved config, the
manifest (what produced the run), and the final summary."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore", "numpy", "tokenizers")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def git_state(path: Path) -> dict:
    """Commit and dirty flag of the git checkout holding `path` (None outside a checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_manifest(run_dir: Path, *, seed: int, data_fingerprint: str, data_stats: dict, resumed_from: int | None):
    devices = jax.devices()
    manifest = {
        "git": git_state(Path(__file__).resolve().parent),
        "packages": package_versions(),
        "platform": platform.platform(),
        "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
                    "processes": jax.process_count()},
        "data": {"fingerprint": data_fingerprint, **data_stats},
        "seed": seed,
        "resumed_from_step": resumed_from,
        "command": sys.argv,
    }
    write_json(run_dir / "manifest.json", manifest)
    return manifest


def params_sha256(params) -> str:
    """A digest of the parameter values (path-sorted, raw bytes): equal digests mean bitwise-equal models."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
