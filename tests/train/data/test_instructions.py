"""The embedded instruction set (train/data/instructions.py): requests from docstrings, answers from
source, whole modules held out for validation."""

from __future__ import annotations

import json

import pytest

from train.data.instructions import main, request_for, stdlib_instructions, third_person

MODULE = '''
def area(width, height=1):
    """Return the area of a rectangle of the given size."""
    return width * height


def _private(x):
    """Return x unchanged, which nobody outside needs."""
    return x


def undocumented(x):
    return x


def helper(x):
    """Internal helper used by area."""
    return x


def scale(points, factor):
    """Multiplies every point by factor, keeping the origin."""
    return [p * factor for p in points]
'''


@pytest.mark.parametrize("verb, want", [("Return", "returns"), ("Match", "matches"), ("Copy", "copies"),
                                        ("Do", "does"), ("Play", "plays"), ("Push", "pushes")])
def test_third_person(verb, want):
    assert third_person(verb) == want


def test_requests_read_as_instructions_or_are_left_out():
    assert request_for("area", "width, height=1", "Return the area of a rectangle.") == \
        "Write a function `area(width, height=1)` that returns the area of a rectangle."
    assert request_for("scale", "p", "Multiplies every point.") == "Write a function `scale(p)` that multiplies every point."
    assert request_for("f", "", "The thing that does it") is None  # not imperative
    assert request_for("f", "", "Return x") is None  # too short to say anything


def test_conversations_from_a_tree_hold_out_whole_modules(tmp_path):
    for i in range(30):
        (tmp_path / f"mod{i}.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def (:\n")  # not Python 3: skipped, not an error
    train, val = stdlib_instructions(root=tmp_path, val_every=5)
    assert train and val
    for conv in train + val:
        roles = [m["role"] for m in conv["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"],
                         ["user", "assistant", "user", "assistant"], ["system", "user", "assistant", "user", "assistant"])
        for m in conv["messages"]:
            if m["role"] == "assistant":
                assert m["content"].startswith(("def area(", "def scale("))
    asked = {m["content"] for c in train for m in c["messages"] if m["role"] == "user"}
    assert any("Now write a function" in a for a in asked)  # some conversations take a second turn
    assert not any("_private" in a or "helper" in a or "undocumented" in a for a in asked)
    # the same module always lands in the same split
    assert stdlib_instructions(root=tmp_path, val_every=5) == (train, val)
    long_only = stdlib_instructions(root=tmp_path, val_every=5, max_answer_chars=10)
    assert long_only == ([], [])


def test_command_writes_jsonl(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(MODULE.replace("rectangle", "rectangle é"))
    assert main(["--out", str(tmp_path / "out"), "--root", str(tmp_path / "src")]) == 0
    lines = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    val = (tmp_path / "out" / "val.jsonl").read_text(encoding="utf-8").splitlines()
    convs = [json.loads(line) for line in lines + val]
    assert len(convs) == 2  # area, then scale in a conversation of its own
    assert "rectangle é" in json.dumps(convs[0], ensure_ascii=False)
    assert "wrote" in capsys.readouterr().out
