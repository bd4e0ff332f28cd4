"""`python -m infer COMMAND ...`: the inference command line (thin: parse, check, call a function).

    python -m infer sample --run runs/quickstart --prompt "def " --max-new-tokens 64 --temperature 0.8
    python -m infer sample --run runs/llama --prompt "def " --mesh tensor=8     # split over 8 devices

Commands are argparse subcommands, each a `cmd_<name>(args) -> exit code` registered in
`build_parser`, so `serve`, `chat`, `export`, `import-hf` slot in beside `sample`. User mistakes
(missing run, bad numbers, text the tokenizer cannot encode) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

DEFAULT_MAX_NEW_TOKENS = 256


class UserError(Exception):
    """A mistake the user can fix; its message is printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line (no usage block) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m infer", description="Sample from, serve and export jaxlm checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("sample", help="continue a prompt with a trained checkpoint",
                       description="Load a checkpoint (config and tokenizer come from it), continue "
                                   "the prompt and print prompt + completion.")
    p.add_argument("--run", required=True, help="run directory (or its checkpoints/ directory)")
    p.add_argument("--prompt", required=True, help='text to continue ("" starts from the EOS token)')
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"tokens to generate (default {DEFAULT_MAX_NEW_TOKENS}); past the model's "
                        "context the window slides over the last max_seq_len/2 tokens")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--matmul", choices=("xla", "pallas"), default="xla",
                   help="dense-layer matmul for sampling, whatever the checkpoint was trained with (default xla; "
                        "pallas needs a GPU/TPU)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalize tokens already present (1 = off)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not printed")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8 with per-channel scales (default none)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_mesh_arguments(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="serialize prefill and decode (weights included) with jax.export",
                       description="Write one file that infer/load_exported.py runs with only jax and numpy.")
    p.add_argument("--run", required=True, help="run directory (or its checkpoints/ directory)")
    p.add_argument("--out", required=True, help="artifact file to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--batch", type=int, default=1, help="rows per call the artifact is compiled for (default 1)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none")
    p.add_argument("--platforms", default="", metavar="P,...",
                   help="where the artifact may run: cpu, cuda, rocm, tpu, comma-separated (default: this machine's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="turn a Hugging Face GPT-2 / Llama directory into a run directory",
                       description="Read config.json, *.safetensors and tokenizer.json of a GPT2LMHeadModel or "
                                   "LlamaForCausalLM directory and write a run directory `sample` accepts.")
    p.add_argument("hf_dir", help="Hugging Face model directory")
    p.add_argument("run_dir", help="new run directory to write")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="write a run's checkpoint as a Hugging Face directory",
                       description="Write config.json, model.safetensors (and tokenizer.json for BPE) that "
                                   "transformers loads as GPT2LMHeadModel or LlamaForCausalLM.")
    p.add_argument("run_dir", help="run directory (or its checkpoints/ directory)")
    p.add_argument("hf_dir", help="output directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.set_defaults(func=cmd_export_hf)

    from infer.server import add_serve_parser  # no web framework imported until `serve` runs

    add_serve_parser(sub)
    from infer.chat import add_chat_parser

    add_chat_parser(sub)
    return parser


def add_mesh_arguments(p: argparse.ArgumentParser) -> None:
    """`--mesh` and `--rules`: split the model over this host's devices as training does."""
    from sharding.rules import RULE_PRESETS

    p.add_argument("--mesh", default="", metavar="AXIS=N,...",
                   help="split the model over this host's devices, e.g. tensor=8, fsdp=2,tensor=4 or data=2,tensor=4 "
                        "(heads and KV cache over tensor, slots over data; default: one device)")
    p.add_argument("--rules", default="fsdp_tp", choices=tuple(RULE_PRESETS),
                   help="logical-axis rule preset for --mesh (default fsdp_tp)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from sharding.host_memory import HostMemorySettingError, keep_freed_host_memory

    # Orbax logs routine notes (read-only manager options, ...) as absl warnings; a command's stderr
    # is for what the user must act on.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        keep_freed_host_memory()  # before JAX's first computation: see sharding/host_memory.py
        return args.func(args)
    except (UserError, HostMemorySettingError) as e:
        print(f"python -m infer {args.command}: error: {e}", file=sys.stderr)
        return 2


def check_sampling_args(args: argparse.Namespace) -> None:
    """Reject impossible numbers before anything heavy is imported."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} must be a positive integer")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature={args.temperature} must be >= 0 (0 = greedy)")
    if args.top_k < 0:
        raise UserError(f"--top-k={args.top_k} must be >= 0 (0 = no top-k filtering)")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p={args.top_p} must be in (0, 1] (1 = no nucleus filtering)")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed={args.seed} must be in [0, 2**32)")
    if args.step is not None and args.step < 0:
        raise UserError(f"--step={args.step} must be >= 0")
    if not 0.0 <= args.min_p < 1.0:
        raise UserError(f"--min-p={args.min_p} must be in [0, 1) (0 = off)")
    if not math.isfinite(args.repetition_penalty) or args.repetition_penalty <= 0:
        raise UserError(f"--repetition-penalty={args.repetition_penalty} must be > 0 (1 = off)")
    if any(not s for s in args.stop):
        raise UserError("--stop strings must not be empty")


def load_checkpoint(run: str, step: int | None):
    """model.checkpoint.load_for_inference (config, model, tokenizer, step), user errors as UserError."""
    if not Path(run).is_dir():
        raise UserError(f"--run={run}: no such run or checkpoint directory")
    from model.checkpoint import load_for_inference
    from model.config import ConfigError

    try:
        return load_for_inference(run, step)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except ConfigError as e:
        raise UserError(f"{run}: the checkpoint's config is invalid: {e}") from None


def load_on_mesh(run: str, step: int | None, mesh: str, rules: str, slots: int | None = None):
    """(LoadedModel, Layout or None): `load_checkpoint`, or with `--mesh` the checkpoint loaded
    straight onto the mesh (infer/sharded.py), checked against the model first: a mesh that cannot
    split it (heads, KV heads, slots, device count) is one UserError line before anything loads."""
    if not mesh:
        return load_checkpoint(run, step), None
    from sharding.mesh import parse_mesh
    from sharding.rules import ShardingError

    try:
        parse_mesh(mesh)  # syntax first: before the run is even looked at
    except ShardingError as e:
        raise UserError(str(e)) from None
    if not Path(run).is_dir():
        raise UserError(f"--run={run}: no such run or checkpoint directory")
    from infer.sharded import load_sharded
    from model.config import ConfigError

    try:
        return load_sharded(run, step, mesh, rules, slots)
    except ShardingError as e:
        raise UserError(f"--mesh {mesh} --rules {rules}: {e}") from None
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except ConfigError as e:
        raise UserError(f"{run}: the checkpoint's config is invalid: {e}") from None


def check_sampling_kernels(args: argparse.Namespace) -> None:
    if args.matmul == "pallas":
        from pallas_kernels.platform import PallasPlatformError, check_pallas_platform

        try:
            check_pallas_platform("--matmul pallas")
        except PallasPlatformError as e:
            raise UserError(str(e)) from None


def cmd_sample(args: argparse.Namespace) -> int:
    check_sampling_args(args)
    check_sampling_kernels(args)
    (_, model, tokenizer, _), layout = load_on_mesh(args.run, args.step, args.mesh, args.rules)
    from model.transformer import with_kernels

    model = with_kernels(model, "xla", args.matmul)  # the KV-cache path attends with jnp attention
    try:
        ids = [int(i) for i in tokenizer.encode(args.prompt)]
    except ValueError as e:  # e.g. a character the char tokenizer does not know
        raise UserError(f"--prompt: {e}") from None
    if not ids:
        if tokenizer.eos_id is None:
            raise UserError(f"--prompt is empty and the {tokenizer.kind} tokenizer has no EOS token to start "
                            "from; give at least one character")
        ids = [tokenizer.eos_id]

    max_new = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens

    from infer.sampler import generate_text

    on_token = None
    if args.stream:
        sys.stdout.write(args.prompt)
        eos = tokenizer.eos_id

        def on_token(step, tokens, emitted):  # one row: print each token as it arrives
            if emitted[0] and tokens[0] != eos:
                sys.stdout.write(tokenizer.decode([int(tokens[0])]))
                sys.stdout.flush()
    for x in args.stop:  # generate_text encodes them; a character the tokenizer lacks is a user error
        try:
            tokenizer.encode(x)
        except ValueError as e:
            raise UserError(f"--stop {x!r}: {e}") from None
    # Past the model's context the window slides (generate_long), so any length can be asked for.
    text = generate_text(model, tokenizer, [args.prompt], max_new_tokens=max_new, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                         min_p=args.min_p, repetition_penalty=args.repetition_penalty, on_token=on_token,
                         quantize=args.quantize, layout=layout)[0]
    if args.stream:
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    sys.stdout.write(args.prompt + text + "\n")
    sys.stdout.flush()
    return 0


def _hf_module():
    try:
        from infer import hf
        import safetensors  # noqa: F401
    except ImportError as e:
        raise UserError(f"{e.name} is not installed; install the hf extra: pip install -e \".[hf]\"") from None
    return hf


def cmd_import_hf(args: argparse.Namespace) -> int:
    hf = _hf_module()
    if not Path(args.hf_dir).is_dir():
        raise UserError(f"{args.hf_dir}: no such directory")
    try:
        out = hf.import_hf(args.hf_dir, args.run_dir)
    except (hf.HFError, KeyError) as e:
        raise UserError(f"{args.hf_dir}: {e}" if isinstance(e, KeyError) else str(e)) from None
    print(f"wrote {out} (sample with: python -m infer sample --run {out} --prompt TEXT)")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    hf = _hf_module()
    loaded = load_checkpoint(args.run_dir, args.step)  # user errors (missing run, bad step) as one line
    try:
        out = hf.export_hf(loaded, args.hf_dir)
    except hf.HFError as e:
        raise UserError(str(e)) from None
    print(f"wrote {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UserError(f"--batch={args.batch} must be a positive integer")
    if args.step is not None and args.step < 0:
        raise UserError(f"--step={args.step} must be >= 0")
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip()) or None
    if platforms and not set(platforms) <= {"cpu", "cuda", "rocm", "tpu"}:
        raise UserError(f"--platforms={args.platforms}: each must be one of cpu, cuda, rocm, tpu")
    loaded = load_checkpoint(args.run, args.step)  # user errors (missing run, bad step) as one line
    from infer.export import export_run

    out = export_run(loaded, args.out, batch=args.batch, quantize=None if args.quantize == "none" else args.quantize,
                     platforms=platforms)
    print(f"wrote {out} (run it with: python -m infer.load_exported {out} --chat, --prompt TEXT or --ids ...)")
    return 0
