"""Recipes and the results they promise: the machine-readable `# expect:` block of a recipe's header.

A recipe is a YAML file under `experiments/` (named by its path there without `.yaml`, e.g.
`shakespeare_char_cpu`, `scaling/d64_l3`). Its header comment holds one block that a checker
can compare with a run's `summary.json`:

    # expect:                       # the expected result, checked by `python -m experiments`
    #   metric: val_loss            # a key of the run's summary.json
    #   value: 1.893516             # what was measured (a number, or a string such as a sha256)
    #   tolerance: 0.01             # numbers: pass when |measured - value| <= tolerance; strings: must be equal
    #   hardware: cpu-2core         # the machine the value holds for (experiments/results.md names them)
    #   time_s: 90                  # wall time of the whole run on that hardware (informative, never a failure)
    #   measured: experiments/results.md, 2026-11-27   # where the value comes from
    #   status: measured            # or not-measured: value is a published reference, never run here

The block is the lines `#   key: value` that follow `# expect:` (YAML once the `#` is removed;
a `#` comment after a value is allowed). `status: not-measured` marks a value that no jaxlm run has
produced yet (e.g. a GPU recipe run only by its original authors): a check against it reports
UNVERIFIED instead of PASS or FAIL. A recipe without a block, or with a block that does not
parse, is an `ExpectationError` whose one-line message names the file and what is wrong.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

EXPERIMENTS_DIR = Path(__file__).resolve().parent
STATUSES = ("measured", "not-measured")
REQUIRED = ("metric", "value", "tolerance", "hardware", "time_s", "measured")
OPTIONAL = ("status",)
_BLOCK_START = re.compile(r"^#\s*expect:\s*(#.*)?$")  # a comment may follow
_BLOCK_LINE = re.compile(r"^#(\s{2,}\S.*)$")  # indented continuation: "#   key: value"


class ExpectationError(ValueError):
    """A recipe that is missing, or whose `# expect:` block is absent or malformed (one-line message)."""


@dataclass(frozen=True)
class Expectation:
    """The result a recipe promises on `hardware` (see the module docstring for the fields)."""

    metric: str
    value: float | str
    tolerance: float
    hardware: str
    time_s: float
    measured: str
    status: str = "measured"

    @property
    def is_measured(self) -> bool:
        return self.status == "measured"

    def describe(self) -> str:
        """`val_loss 1.893516 ± 0.01` (strings: `params_sha256 = 0d73f72d…`)."""
        if isinstance(self.value, str):
            return f"{self.metric} = {self.value[:12]}…" if len(self.value) > 12 else f"{self.metric} = {self.value}"
        return f"{self.metric} {self.value} ± {self.tolerance:g}"


@dataclass(frozen=True)
class Check:
    """One expectation compared with one measured value."""

    metric: str
    expected: float | str
    tolerance: float
    measured: Any
    verdict: str  # PASS | FAIL | UNVERIFIED (the expectation was never measured) | MISSING (not in the summary)

    @property
    def difference(self) -> float | None:
        if isinstance(self.expected, str) or not isinstance(self.measured, (int, float)):
            return None
        return float(self.measured) - float(self.expected)


# ---- finding recipes ------------------------------------------------------------------------

def recipe_paths(root: Path = EXPERIMENTS_DIR) -> dict[str, Path]:
    """Every recipe under `root` by name: `*.yaml`, then those one folder down (`scaling/*.yaml`), numbers
    in names in numeric order (d32 before d128)."""
    def key(p: Path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.as_posix())]

    paths = sorted(root.glob("*.yaml"), key=key) + sorted(root.glob("*/*.yaml"), key=key)
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in paths if not is_routing_policy(p)}


def is_routing_policy(path: Path) -> bool:
    """A serving routing policy (`experiments/hybrid.yaml`, read by infer/agent/route.py: a top-level
    `backends:` list) lives beside the recipes but is not a training recipe."""
    return any(line.startswith("backends:") for line in path.read_text().splitlines())


def find_recipe(name: str, root: Path = EXPERIMENTS_DIR) -> Path:
    """A recipe by name (`shakespeare_char_cpu`, `scaling/d64_l3`) or by the path of a YAML file."""
    recipes = recipe_paths(root)
    if name in recipes:
        return recipes[name]
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    raise ExpectationError(f"no recipe {name!r}; recipes: {', '.join(recipes)} (or the path of a YAML file)")


# ---- reading the block --------------------------------------------------------------------

def read_expectation(path: str | Path) -> Expectation:
    """Parse the `# expect:` block of the recipe at `path` (ExpectationError with one line if it cannot)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ExpectationError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    start = next((i for i, line in enumerate(lines) if _BLOCK_START.match(line)), None)
    if start is None:
        raise ExpectationError(f"{path}: no '# expect:' block in the header; add one with "
                               f"{', '.join(REQUIRED)} (see experiments/expectations.py)")
    body = []
    for line in lines[start + 1:]:
        m = _BLOCK_LINE.match(line)
        if not m:
            break
        body.append(m.group(1))
    try:
        fields = yaml.safe_load("\n".join(body)) if body else None
    except yaml.YAMLError as e:
        raise ExpectationError(f"{path}: the '# expect:' block is not valid YAML "
                               f"({getattr(e, 'problem', None) or e})") from None
    if not isinstance(fields, dict):
        raise ExpectationError(f"{path}: the '# expect:' block must be indented '#   key: value' lines with "
                               f"{', '.join(REQUIRED)}")
    return expectation_from_dict(fields, where=str(path))


def expectation_from_dict(fields: dict[str, Any], where: str = "expectation") -> Expectation:
    """Validate the block's fields: every required key, no unknown one, the right types."""
    unknown = sorted(set(fields) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ExpectationError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} in '# expect:'; "
                               f"allowed: {', '.join(REQUIRED + OPTIONAL)}")
    missing = [k for k in REQUIRED if fields.get(k) is None]
    if missing:
        raise ExpectationError(f"{where}: '# expect:' lacks {', '.join(missing)} "
                               f"(required: {', '.join(REQUIRED)})")
    value, tol, status = fields["value"], fields["tolerance"], fields.get("status", "measured")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ExpectationError(f"{where}: expect value={value!r} must be a number or a string")
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ExpectationError(f"{where}: expect value={value!r} must be finite")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ExpectationError(f"{where}: expect tolerance={tol!r} must be a number >= 0")
    if isinstance(value, str) and tol != 0:
        raise ExpectationError(f"{where}: expect value is a string, so tolerance must be 0 (exact match), "
                               f"not {tol!r}")
    t = fields["time_s"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ExpectationError(f"{where}: expect time_s={t!r} must be a positive number of seconds")
    if status not in STATUSES:
        raise ExpectationError(f"{where}: expect status={status!r} is not one of {', '.join(STATUSES)}")
    for key in ("metric", "hardware", "measured"):
        if not isinstance(fields[key], str) or not fields[key].strip():
            raise ExpectationError(f"{where}: expect {key}={fields[key]!r} must be a non-empty string")
    return Expectation(metric=fields["metric"], value=value if isinstance(value, str) else float(value),
                       tolerance=float(tol), hardware=fields["hardware"], time_s=float(t),
                       measured=fields["measured"], status=status)


# ---- checking a run -----------------------------------------------------------------------

def check(expectation: Expectation, summary: dict[str, Any]) -> Check:
    """Compare a run's summary (summary.json) with the expectation."""
    e = expectation
    measured = summary.get(e.metric)
    if measured is None:
        verdict = "MISSING"
    elif not e.is_measured:
        verdict = "UNVERIFIED"
    elif isinstance(e.value, str):
        verdict = "PASS" if str(measured) == e.value else "FAIL"
    elif isinstance(measured, (int, float)) and not isinstance(measured, bool) and math.isfinite(measured):
        verdict = "PASS" if abs(float(measured) - e.value) <= e.tolerance + 1e-12 else "FAIL"
    else:
        verdict = "FAIL"
    return Check(e.metric, e.value, e.tolerance, measured, verdict)
