"""The import direction of the packages (DESIGN.md): `model/` is what a trained model *is*, so it
imports neither the trainer nor inference; `infer/` (a long-running server among it) never pulls in
the trainer. Read from the source with `ast`, so an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "model": {"train", "infer"},
    "infer": {"train"},
    "sharding": {"infer"},
    "pallas_kernels": {"infer"},
}

# The only exceptions, each with its reason. Benchmarks that compare against PyTorch may import what
# they measure; a command that plans or checks a *training* run may read the training config.
ALLOWED = {
    # decode speed against the PyTorch model of train/torch_baseline.py, with the worker and
    # timing helpers of the train-step benchmark (train/bench.py) it is measured beside
    "infer/bench_torch.py": {"train.bench", "train.torch_baseline"},
    # per-device memory of a training run: its experiment config and optimizer state
    "sharding/plan.py": {"train.config", "train.optim"},
    # the GPU check trains gpt2-124m for MFU with the trainer's own step and optimizer
    "pallas_kernels/gpu_check.py": {"train.config", "train.metrics", "train.optim", "train.step"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module name) of every absolute import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if "." in node.module:
                out += [(node.lineno, node.module)]
            else:  # `from train import torch_baseline` imports the module train.torch_baseline
                out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return out


def violations(root: Path = ROOT) -> list[str]:
    found = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top in forbidden and module not in ALLOWED.get(rel, ()):
                    found.append(f"{rel}:{line} imports {module} ({package}/ must not import {top}/)")
    return found


def test_packages_import_in_the_allowed_direction():
    assert violations() == []


def test_the_check_catches_a_trainer_import_in_infer(tmp_path):
    for package in FORBIDDEN:
        (tmp_path / package).mkdir()
    (tmp_path / "infer" / "server.py").write_text("def load():\n    from train.checkpoint import Checkpointer\n")
    (tmp_path / "model" / "ok.py").write_text("import jax\nfrom sharding.rules import rules_for\n")
    assert violations(tmp_path) == ["infer/server.py:2 imports train.checkpoint (infer/ must not import train/)"]


def test_exceptions_name_files_that_exist():
    for rel in ALLOWED:
        assert (ROOT / rel).is_file(), rel
