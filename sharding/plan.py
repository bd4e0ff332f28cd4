"""Memory plan of an experiment on its mesh, printed before anything runs (nothing compiles).

    python -m sharding.plan experiments/quickstart.yaml mesh.fsdp=4 mesh.tensor=2
    python -m sharding.plan experiments/quickstart.yaml model.preset=llama3-8b mesh.fsdp=-1 --devices 256

Per device: parameters, optimizer state and gradients (exact, from the parameters' shapes and the
rule preset's shardings), and activations kept for the backward pass (an estimate, no remat: per
layer and token the block's inputs and outputs, q/k/v, the MLP hidden, and the float32 attention
scores and probabilities; plus the float32 logits). Then, for each named accelerator, whether the
total fits its memory with 10% kept free for XLA's buffers and fragmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

ACCELERATOR_GIB = {  # memory per chip / GPU
    "TPU v4": 32, "TPU v5e": 16, "TPU v5p": 95, "TPU v6e": 32, "H100": 80, "A100": 80,
}
HEADROOM = 0.9  # fraction of an accelerator's memory a plan may use
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _shards(axes, mesh_shape, rules) -> list[int]:
    from sharding.rules import mesh_axes_of

    return [math.prod(mesh_shape.get(a, 1) for a in mesh_axes_of(name, rules)) for name in axes]


def memory_plan(cfg, mesh_shape: dict[str, int]) -> dict[str, float]:
    """Bytes per device: params, optimizer, gradients, activations, total (see module docstring)."""
    import jax
    from flax import nnx

    from model.transformer import abstract_model
    from sharding.rules import rules_for, validate_state
    from train.optim import make_optimizer

    rules = rules_for(cfg.mesh.rules)
    m = cfg.model
    _, abstract = abstract_model(m)
    validate_state(abstract, mesh_shape, rules)
    params = 0.0
    param_elems = 0
    for var in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        n = math.prod(var.shape)
        param_elems += n
        params += n / math.prod(_shards(axes, mesh_shape, rules)) * _BYTES[m.param_dtype]
    opt_shapes = jax.eval_shape(make_optimizer(cfg.optim, cfg.train.steps).init, nnx.to_pure_dict(abstract))
    opt_elems = sum(math.prod(x.shape) for x in jax.tree.leaves(opt_shapes) if x.ndim > 0)
    optimizer = params * opt_elems / param_elems  # its state is sharded like the parameters

    # Activations: tokens per device of one (micro)batch; GPipe keeps all microbatches of a stage.
    batch_shards, seq_shards, t_heads, t_kv, t_mlp, t_vocab, stages = _shards(
        ("batch", "seq", "heads", "kv_heads", "mlp", "vocab", "layers"), mesh_shape, rules)
    rows = cfg.train.batch_size / cfg.optim.grad_accum / batch_shards
    L = cfg.data.seq_len
    tokens = rows * L / seq_shards
    c = _BYTES[m.compute_dtype]
    D, H, K, Dh, F = m.d_model, m.n_heads, m.kv_heads, m.head_dim, m.ff_dim
    per_token = c * (6 * D + 2 * H * Dh / t_heads + 2 * K * Dh / t_kv + (3 if m.mlp == "swiglu" else 2) * F / t_mlp)
    per_token += 4 * 2 * H / t_heads * L  # float32 scores and probabilities over the whole key length
    activations = tokens * per_token * m.n_layers / stages + tokens * 4 * 2 * m.vocab_size / t_vocab
    total = 2 * params + optimizer + activations  # parameters, their gradients, optimizer state, activations
    return {"params": params, "gradients": params, "optimizer": optimizer, "activations": activations,
            "total": total}


def _vocab_size(cfg):
    if cfg.model.vocab_size:
        return cfg
    sizes = {"byte": 257, "bpe": cfg.data.bpe_vocab_size}
    if cfg.data.tokenizer not in sizes:
        raise SystemExit("error: set model.vocab_size to plan a run with data.tokenizer=char "
                         "(its size depends on the corpus)")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=sizes[cfg.data.tokenizer]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--devices", type=int, default=0, help="plan for this many devices (default: those visible)")
    args = parser.parse_args(argv)

    from sharding.mesh import dcn_sizes, resolve_axis_sizes
    from sharding.rules import MESH_AXES, ShardingError
    from train.config import ConfigError, load_config

    try:
        cfg = _vocab_size(load_config(args.experiment, args.overrides))
        if args.devices:
            n = args.devices
        else:
            import jax
            n = jax.device_count()
        dcn = dcn_sizes(cfg.mesh)
        n_slices = math.prod(dcn.values())
        if n % n_slices:
            raise ShardingError(f"the dcn_* sizes give {n_slices} slices, which does not divide {n} devices")
        ici = resolve_axis_sizes({a: getattr(cfg.mesh, a) for a in MESH_AXES}, n // n_slices)
        mesh_shape = {a: ici[a] * dcn[a] for a in MESH_AXES}
        plan = memory_plan(cfg, mesh_shape)
    except (ConfigError, ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    gib = 2.0 ** 30
    m = cfg.model
    print(f"model: {m.num_params() / 1e6:.1f}M parameters ({m.param_dtype}), compute {m.compute_dtype}; "
          f"batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens, grad_accum {cfg.optim.grad_accum}")
    print(f"mesh: {n} devices  " + "  ".join(f"{a}={s}" for a, s in mesh_shape.items())
          + f"  rules={cfg.mesh.rules}")
    print(f"\n{'per device':<14}{'GiB':>10}")
    for k in ("params", "gradients", "optimizer", "activations", "total"):
        print(f"{k:<14}{plan[k] / gib:>10.3f}")
    print(f"\n{'accelerator':<12}{'memory GiB':>12}{'used':>8}  fits (<= {HEADROOM:.0%})")
    for name, mem in ACCELERATOR_GIB.items():
        used = plan["total"] / (mem * gib)
        print(f"{name:<12}{mem:>12}{used:>8.1%}  {'yes' if used <= HEADROOM else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
