"""Train a language model.

    python -m train experiments/quickstart.yaml                      # train (or resume) a run
    python -m train experiments/shakespeare_char_cpu.yaml data.path=tinyshakespeare.txt
    python -m train runs/quickstart train.steps=2000                 # resume / extend a run directory

Overrides are `section.key=value` (sections: model, data, optim, train, mesh, checkpoint, run).
A run directory that holds checkpoints resumes from the latest intact one. SIGTERM or Ctrl-C saves
the current step and exits 0 (rerun the same command to continue); `python -m train.chaos` checks
that killed-and-restarted runs end bit-identical to uninterrupted ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("experiment", help="experiment YAML, or a run directory to resume")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    from sharding.host_memory import HostMemorySettingError, keep_freed_host_memory

    try:
        keep_freed_host_memory()  # before JAX's first computation: see sharding/host_memory.py
    except HostMemorySettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from train.config import ConfigError, load_config
    from train.guard import NonFiniteLossError

    try:
        path = Path(args.experiment)
        overrides = list(args.overrides)
        if path.is_dir():  # a run directory: its resolved config, pointed back at itself
            if not (path / "config.yaml").is_file():
                raise ConfigError(f"{path} is a directory without config.yaml; pass an experiment YAML or a run directory")
            overrides.append(f"run.dir={path}")
            path = path / "config.yaml"
        cfg = load_config(path, overrides)
        from train.loop import train

        summary = train(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary.get("preempted"):
        print(f"preempted ({summary['signal']}): saved step {summary['step']} to {summary['checkpoint']}; "
              f"{summary['signal_to_exit_s']:.2f} s from signal to exit", flush=True)
        return 0
    print(f"done: step {summary['step']}  val_loss {summary['val_loss']:.4f}  "
          f"tokens/s {summary['tokens_per_s'] or 0:.0f}  run {cfg.run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
