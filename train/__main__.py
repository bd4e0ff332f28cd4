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
import contextlib
import logging
import sys
from pathlib import Path


@contextlib.contextmanager
def _unimportable(*names: str):
    """`import name` raises ImportError inside the block, for modules not loaded yet. flax imports
    IPython only to ask whether it is running inside IPython (it is not, when IPython was never
    imported): 1.8 s and 19 MB of the command's start-up for nothing."""
    hidden = [n for n in names if n not in sys.modules]
    for n in hidden:
        sys.modules[n] = None
    try:
        yield
    finally:
        for n in hidden:
            if sys.modules.get(n, 0) is None:
                del sys.modules[n]


def main(argv: list[str] | None = None) -> int:
    from train.timeline import process_timeline

    timeline = process_timeline()  # from the process's start: the interpreter's start-up counts
    timeline.mark("interpreter")
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
    from train.compile_cache import CompileCacheSettingError, enable_compile_cache

    try:
        cache = enable_compile_cache()  # before the first compile: a rerun loads its executables
    except CompileCacheSettingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    with _unimportable("IPython"):
        from train.config import ConfigError, load_config
        from train.guard import NonFiniteLossError
        from train.loop import train

    try:
        path = Path(args.experiment)
        overrides = list(args.overrides)
        if path.is_dir():  # a run directory: its resolved config, pointed back at itself
            if not (path / "config.yaml").is_file():
                raise ConfigError(f"{path} is a directory without config.yaml; pass an experiment YAML or a run directory")
            overrides.append(f"run.dir={path}")
            path = path / "config.yaml"
        cfg = load_config(path, overrides)
        timeline.mark("imports")
        logging.getLogger("train").info("persistent compilation cache (train/compile_cache.py): %s", cache)
        summary = train(cfg, timeline, whole_process=True)
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
    print(timeline.line(), flush=True)  # also in <run>/timeline.json
    return 0


if __name__ == "__main__":
    sys.exit(main())
