"""Recipes that check themselves, and the scaling study.

    python -m experiments list                                      # every recipe, its expected result and time
    python -m experiments reproduce shakespeare_char_cpu data.path=tinyshakespeare.txt
    python -m experiments check shakespeare_char_cpu runs/shakespeare_char_cpu   # check a finished run
    python -m experiments scaling [--dir runs/scaling] [--out PNG] [key=value ...]

`reproduce NAME [key=value ...]` trains the recipe (overrides pass through to it, as with
`python -m train`) and prints expected against measured; exit status 0 for PASS (or UNVERIFIED:
the recipe's value was never measured with jaxlm), 1 for FAIL, 2 for a user mistake (unknown
recipe, missing or malformed `# expect:` block, bad override). The expectation format is
described in experiments/expectations.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def cmd_list(root: Path | None = None) -> int:
    """Print every recipe under `root` (default experiments/) with its expectation; 2 if one is invalid."""
    from experiments.expectations import EXPERIMENTS_DIR, ExpectationError, read_expectation, recipe_paths

    rows, errors = [], []
    for name, path in recipe_paths(root or EXPERIMENTS_DIR).items():
        try:
            e = read_expectation(path)
            status = "measured" if e.is_measured else "NOT MEASURED (a reference value)"
            rows.append((name, e.describe(), e.hardware, _duration(e.time_s), status))
        except ExpectationError as err:
            errors.append(str(err))
            rows.append((name, "INVALID (see below)", "-", "-", "-"))
    head = ("recipe", "expected", "hardware", "time", "status")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 2 if errors else 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("list", help="every recipe with its expected result and time")
    lp.add_argument("--root", type=Path, default=None, help="the recipes' folder (default: experiments/)")
    rp = sub.add_parser("reproduce", help="run a recipe and compare its result with its expectation")
    rp.add_argument("recipe", help="a recipe name (see list) or the path of a recipe YAML")
    rp.add_argument("overrides", nargs="*", help="section.key=value, passed to the recipe")
    cp = sub.add_parser("check", help="compare a finished run's summary.json with a recipe's expectation")
    cp.add_argument("recipe")
    cp.add_argument("run_dir", type=Path)
    sp = sub.add_parser("scaling", help="run the scaling study's missing sizes, fit L(N), draw the figure")
    sp.add_argument("--dir", type=Path, default=Path("runs/scaling"), help="where the sizes' runs go")
    sp.add_argument("--out", type=Path, default=None, help="the PNG (default: <dir>/scaling.png)")
    sp.add_argument("--no-run", action="store_true", help="only fit and plot the sizes that have finished")
    sp.add_argument("overrides", nargs="*", help="section.key=value, passed to every size")
    args = parser.parse_args(argv)

    if args.command == "list":
        return cmd_list(args.root)

    from sharding.host_memory import keep_freed_host_memory_or_exit

    keep_freed_host_memory_or_exit("python -m experiments")  # before JAX's first computation
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from experiments.expectations import ExpectationError
    from model.config import ConfigError
    from train.guard import NonFiniteLossError

    try:
        if args.command == "reproduce":
            from experiments.reproduce import exit_code, reproduce

            return exit_code(reproduce(args.recipe, args.overrides)["verdict"])
        if args.command == "check":
            from experiments.reproduce import check_run, exit_code

            return exit_code(check_run(args.recipe, args.run_dir)["verdict"])
        from experiments.scaling import study

        study(args.dir, args.out, args.overrides, run=not args.no_run)
        return 0
    except (ExpectationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
