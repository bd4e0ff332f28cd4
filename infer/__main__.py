"""`python -m infer sample --run RUN_DIR --prompt TEXT`: see infer/cli.py."""

from infer.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
