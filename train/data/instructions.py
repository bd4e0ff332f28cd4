"""An instruction set derived from the Python standard library, found on every machine: the default
fine-tuning data, so pretrain -> fine-tune -> serve -> chat runs with no download.

Each example is a conversation in the OpenAI fine-tuning format, `{"messages": [{"role", "content"}, ...]}`:
the first line of a documented function's docstring becomes the request ("Write a function that
returns ..."), the function's source the answer. Some conversations take a second turn from the same
module ("Now write a function that ..."), so multi-turn prompts are seen too. Whole modules are held
out for validation (`val_every`-th module by a stable hash of its path), so a validation answer was
never trained on as an answer.

    python -m train.data.instructions --out data/stdlib_chat   # writes train.jsonl and val.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Iterator

SYSTEM_PROMPT = "You are a Python programming assistant. Answer with Python code."
_VERB = re.compile(r"^[A-Z][a-z]+$")
_NOT_VERBS = {"A", "An", "The", "This", "These", "That", "If", "For", "In", "Internal", "Helper", "Used", "Like",
              "Same", "Private", "Deprecated", "Utility", "Alias", "Compatibility", "Simple", "Default", "Called",
              "Note", "See", "Test", "Dummy", "Unused", "Undocumented", "Backwards"}


def third_person(verb: str) -> str:
    """'Return' -> 'returns', 'Match' -> 'matches', 'Copy' -> 'copies' (docstrings are imperative)."""
    v = verb.lower()
    if v.endswith(("s", "sh", "ch", "x", "z", "o")):
        return v + "es"
    if v.endswith("y") and len(v) > 1 and v[-2] not in "aeiou":
        return v[:-1] + "ies"
    return v + "s"


def request_for(name: str, args: str, summary: str) -> str | None:
    """The user's request for a function from its docstring's first line, or None when that line
    does not read as an instruction (it is not imperative, or it is too short to say anything)."""
    summary = " ".join(summary.split()).rstrip(".")
    words = summary.split(" ", 1)
    if len(words) < 2 or len(summary) < 12 or not _VERB.match(words[0]) or words[0] in _NOT_VERBS:
        return None
    if words[0].endswith("s") and not words[0].endswith("ss"):  # already "Returns ..."
        verb = words[0].lower()
    else:
        verb = third_person(words[0])
    return f"Write a function `{name}({args})` that {verb} {words[1]}."


def _functions(source: str) -> Iterator[tuple[str, str, str, str]]:
    """(name, args, docstring first line, source) of each documented top-level function."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a stdlib file for another Python version, or a test fixture
        return
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        text = ast.get_source_segment(source, node)
        if not doc or not text or node.decorator_list:
            continue
        yield node.name, ast.unparse(node.args), doc.strip().splitlines()[0], text


def _is_val(rel: str, val_every: int) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % val_every == 0


def stdlib_instructions(max_answer_chars: int = 1200, val_every: int = 10, second_turn_every: int = 3,
                        root: Path | None = None) -> tuple[list[dict], list[dict]]:
    """(train, val) conversations from the standard library under `root` (default: this interpreter's),
    in a stable order. Answers longer than `max_answer_chars` are left out, so a conversation of a
    few turns fits a context of 512 BPE tokens."""
    from train.data.sources import stdlib_files

    if root is None:
        root, files = stdlib_files()
    else:
        files = sorted(Path(root).rglob("*.py"))
    train, val = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        pairs = []
        for name, args, summary, text in _functions(source):
            request = request_for(name, args, summary)
            if request is not None and len(text) <= max_answer_chars:
                pairs.append((request, text))
        out = val if _is_val(rel, val_every) else train
        i = 0
        while i < len(pairs):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if len(out) % 2 == 0 else []
            messages += [{"role": "user", "content": pairs[i][0]}, {"role": "assistant", "content": pairs[i][1]}]
            if (len(out) + 1) % second_turn_every == 0 and i + 1 < len(pairs):
                i += 1
                follow = pairs[i][0].replace("Write a function", "Now write a function", 1)
                messages += [{"role": "user", "content": follow}, {"role": "assistant", "content": pairs[i][1]}]
            out.append({"messages": messages})
            i += 1
    return train, val


def write_jsonl(path: Path, conversations: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and val.jsonl")
    parser.add_argument("--max-answer-chars", type=int, default=1200)
    parser.add_argument("--root", default=None, help="a tree of .py files (default: this interpreter's standard library)")
    args = parser.parse_args(argv)
    train, val = stdlib_instructions(args.max_answer_chars, root=Path(args.root) if args.root else None)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "val.jsonl", val)
    print(f"wrote {len(train)} training and {len(val)} validation conversations to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
