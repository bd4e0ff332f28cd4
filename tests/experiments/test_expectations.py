"""Every recipe states its expected result machine-readably; `list` shows them; bad blocks are one line."""

import subprocess
import sys
from pathlib import Path

import pytest

from experiments.__main__ import main
from experiments.expectations import (ExpectationError, check, find_recipe, read_expectation, recipe_paths,
                                      expectation_from_dict)
from train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RECIPES = recipe_paths()
GOOD = """# a recipe
# expect:                 # the expected result
#   metric: val_loss
#   value: 1.5
#   tolerance: 0.01
#   hardware: cpu-2core
#   time_s: 60
#   measured: a test
"""


def test_recipes_are_found_top_level_and_scaling():
    assert {"quickstart", "shakespeare_char_cpu", "shakespeare_char", "chaos"} <= set(RECIPES)
    assert len([n for n in RECIPES if n.startswith("scaling/")]) >= 5
    yamls = set((ROOT / "experiments").glob("*.yaml")) | set((ROOT / "experiments").glob("*/*.yaml"))
    policies = {ROOT / "experiments/hybrid.yaml"}  # a serving routing policy, not a recipe
    assert set(RECIPES.values()) == yamls - policies and policies <= yamls


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_has_a_valid_expectation(name):
    e = read_expectation(RECIPES[name])
    assert e.metric == "val_loss" and isinstance(e.value, float) and 0 < e.tolerance <= 0.05 and e.time_s > 0
    if e.is_measured:
        assert 0 < e.value < 10, e.value
    load_config(RECIPES[name])  # and the recipe itself is a valid experiment


def test_recorded_figures():
    """The values are the measured ones (experiments/results.md); the GPU recipe's is nanoGPT's, marked so."""
    assert read_expectation(RECIPES["shakespeare_char_cpu"]).value == 1.893516
    assert read_expectation(RECIPES["quickstart"]).value == 3.571
    gpu = read_expectation(RECIPES["shakespeare_char"])
    assert gpu.status == "not-measured" and gpu.value == 1.4697
    measured = ["quickstart", "shakespeare_char_cpu", "chaos", *(n for n in RECIPES if n.startswith("scaling/"))]
    assert all(read_expectation(RECIPES[n]).is_measured for n in measured)


def test_list_shows_every_recipe_with_its_expectation(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, path in RECIPES.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        e = read_expectation(path)
        assert e.describe() in line and e.hardware in line
    assert "NOT MEASURED" in next(line for line in out.splitlines() if line.startswith("shakespeare_char "))


def test_block_is_parsed_with_comments(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(GOOD.replace("0.01", "0.01   # absolute") + "#   status: not-measured\n\ntrain:\n  steps: 3\n")
    e = read_expectation(p)
    assert (e.metric, e.value, e.tolerance, e.time_s, e.status) == ("val_loss", 1.5, 0.01, 60.0, "not-measured")


@pytest.mark.parametrize("text, words", [
    ("# no block here\ntrain:\n  steps: 3\n", ["no '# expect:' block"]),
    (GOOD.replace("#   value: 1.5\n", ""), ["lacks value"]),
    (GOOD.replace("value: 1.5", "value: [1.5"), ["not valid YAML"]),
    (GOOD.replace("value: 1.5", "value: low"), ["tolerance must be 0"]),
    (GOOD.replace("tolerance: 0.01", "tolerance: -1"), ["tolerance=-1", ">= 0"]),
    (GOOD.replace("time_s: 60", "time_s: soon"), ["time_s='soon'"]),
    (GOOD + "#   colour: red\n", ["unknown key(s) colour", "allowed"]),
    (GOOD + "#   status: maybe\n", ["status='maybe'", "not-measured"]),
    ("# expect:\n# metric: val_loss\n", ["must be indented"]),
])
def test_malformed_block_is_one_clear_line(tmp_path, text, words):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ExpectationError) as err:
        read_expectation(p)
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("args", [["reproduce", "{bad}"], ["reproduce", "no_such_recipe"], ["check", "{bad}", "{tmp}"]])
def test_cli_missing_or_malformed_expectation_exits_2_with_one_line(tmp_path, args):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# a recipe without an expectation\ntrain:\n  steps: 3\n")
    argv = [a.format(bad=bad, tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-m", "experiments", *argv], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    assert ("no '# expect:' block" in lines[0]) or ("no recipe 'no_such_recipe'" in lines[0] and "quickstart" in lines[0])


def test_list_exits_2_when_a_recipe_is_malformed(tmp_path, capsys):
    (tmp_path / "fine.yaml").write_text(GOOD)
    (tmp_path / "broken.yaml").write_text(GOOD.replace("value: 1.5", "value: [1.5"))
    assert main(["list", "--root", str(tmp_path)]) == 2
    cap = capsys.readouterr()
    assert "fine " in cap.out and "val_loss 1.5 ± 0.01" in cap.out and "broken " in cap.out
    assert cap.err.count("\n") == 1 and "broken.yaml" in cap.err and "not valid YAML" in cap.err


def test_check_verdicts():
    e = expectation_from_dict({"metric": "val_loss", "value": 1.5, "tolerance": 0.01, "hardware": "x",
                               "time_s": 1, "measured": "m"})
    assert check(e, {"val_loss": 1.509}).verdict == "PASS"
    assert check(e, {"val_loss": 1.4899}).verdict == "FAIL"
    assert check(e, {"val_loss": float("nan")}).verdict == "FAIL"
    assert check(e, {"step": 3}).verdict == "MISSING"
    ref = expectation_from_dict({"metric": "val_loss", "value": 1.5, "tolerance": 0.01, "hardware": "x",
                                 "time_s": 1, "measured": "m", "status": "not-measured"})
    assert check(ref, {"val_loss": 9.0}).verdict == "UNVERIFIED"
    sha = expectation_from_dict({"metric": "params_sha256", "value": "abc", "tolerance": 0, "hardware": "x",
                                 "time_s": 1, "measured": "m"})
    assert check(sha, {"params_sha256": "abc"}).verdict == "PASS"
    assert check(sha, {"params_sha256": "abd"}).verdict == "FAIL"


def test_find_recipe_by_name_or_path(tmp_path):
    assert find_recipe("shakespeare_char_cpu") == ROOT / "experiments/shakespeare_char_cpu.yaml"
    assert find_recipe("scaling/d32_l1") == ROOT / "experiments/scaling/d32_l1.yaml"
    p = tmp_path / "mine.yaml"
    p.write_text(GOOD)
    assert find_recipe(str(p)) == p
