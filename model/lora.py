"""LoRA: low-rank adapters on the dense projections of every layer (Hu et al., 2021).

A targeted weight W (*in, *out) gets, in every layer, A (*in, r) and B (r, *out), and its
projection becomes

    x W + (alpha / r) (x A) B          (model/layers.py: `adapted`, called where W is applied)

A starts small and random, B at zero, so a model with fresh adapters computes exactly what its
base computes. Fine-tuning trains A and B only (train/lora.py); for serving and export the update
is folded into the weights, W + (alpha / r) A B (`merge_adapters`), which leaves a plain
`Transformer`.

Adapters live on the stacked `Block` like its weights: a leading `layers` axis, logical axes taken
from W (A: W's input axes then an unsharded rank axis; B: an unsharded rank axis then W's output
axes) and arrays placed with W's own sharding, so they shard as the base does on any mesh. They
are `nnx.LoRAParam`s named `<weight>_lora` beside the weight (`blocks/attn/wq_lora/{a,b}`).

Targets (finetune.lora_targets): q, k, v, o (the attention projections) and mlp (w_up, w_gate for
SwiGLU, w_down).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ConfigError, ModelConfig
from model.layers import dense

# finetune.lora_targets name -> (sub-module of the block, weight, how many leading dims of W are inputs)
TARGET_WEIGHTS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "q": (("attn", "wq", 1),),
    "k": (("attn", "wk", 1),),
    "v": (("attn", "wv", 1),),
    "o": (("attn", "wo", 2),),  # (H, Dh, D): heads and head_dim are contracted
    "mlp": (("mlp", "w_up", 1), ("mlp", "w_gate", 1), ("mlp", "w_down", 1)),
}
SUFFIX = "_lora"


class LoRA(nnx.Module):
    """The adapter of one weight, for all layers: a (n_layers, *in, r), b (n_layers, r, *out)
    (one layer's slices inside the block's scan), and the scale alpha / r."""

    def __init__(self, a: jax.Array, b: jax.Array, a_axes: tuple, b_axes: tuple, scale: float, contract: int):
        self.a = nnx.LoRAParam(a, out_sharding=a_axes)
        self.b = nnx.LoRAParam(b, out_sharding=b_axes)
        self.scale = float(scale)
        self.contract = contract  # leading dims of the weight that are its inputs

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., *in) -> scale * (x A) B: (..., *out), in x's dtype."""
        c = x.dtype
        h = dense(x, self.a[...].astype(c), contract=self.contract)  # (..., r)
        return self.scale * dense(h, self.b[...].astype(c))  # (..., *out)


def target_weights(cfg: ModelConfig, targets: tuple[str, ...] | list[str]) -> list[tuple[str, str, int]]:
    """(sub-module, weight, input dims) of every weight the targets name that the model has."""
    out = []
    for t in targets:
        if t not in TARGET_WEIGHTS:
            raise ConfigError(f"LoRA target {t!r} is not one of {', '.join(TARGET_WEIGHTS)}")
        out += [w for w in TARGET_WEIGHTS[t] if not (w[1] == "w_gate" and cfg.mlp != "swiglu")]
    return out


def parse_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'q,k,v,o' (finetune.lora_targets) -> ('q', 'k', 'v', 'o')."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return tuple(targets)


def scale_of(rank: int, alpha: float) -> float:
    """alpha / r, the factor of the low-rank update."""
    return float(alpha) / rank


def _shapes(contract: int, rank: int, w_shape, w_axes):
    """(a shape, b shape, a axes, b axes) for stacked weight W of shape (n_layers, *in, *out)."""
    lead, ins, outs = w_shape[:1], tuple(w_shape[1:1 + contract]), tuple(w_shape[1 + contract:])
    ax_lead, ax_in, ax_out = w_axes[:1], tuple(w_axes[1:1 + contract]), tuple(w_axes[1 + contract:])
    return ((*lead, *ins, rank), (*lead, rank, *outs), (*ax_lead, *ax_in, None), (*ax_lead, None, *ax_out))


def _rank_spec(w_spec, contract: int, ndim: int, which: str):
    """The PartitionSpec of an adapter from its weight's (`which`: 'a' keeps the input dims' mesh
    axes, 'b' the output dims'; the rank axis is never split)."""
    spec = tuple(w_spec) + (None,) * (ndim - len(tuple(w_spec)))
    if which == "a":
        return jax.sharding.PartitionSpec(*spec[:1 + contract], None)
    return jax.sharding.PartitionSpec(spec[0], None, *spec[1 + contract:])


def add_adapters(model, rank: int, alpha: float, targets, seed: int = 0):
    """Attach rank-`rank` adapters to the targeted weights of every layer of `model` (in place; the
    model is returned). Rank 0 attaches nothing: the model stays its base exactly.

    A ~ normal(0, 1 / sqrt(fan_in)), B = 0, each placed with its weight's sharding (a weight on a
    mesh gets adapters on the same mesh, split along the same axes except the rank)."""
    if rank < 0:
        raise ConfigError(f"finetune.lora_rank={rank} must be >= 0 (0 = no adapters)")
    if rank == 0:
        return model
    cfg, scale = model.cfg, scale_of(rank, alpha)
    key = jax.random.key(seed)
    for i, (module_name, weight, contract) in enumerate(target_weights(cfg, parse_targets(targets))):
        module = getattr(model.blocks, module_name)
        var = getattr(module, weight)
        w = var[...]
        w_axes = tuple(var.get_metadata().get("out_sharding") or (None,) * w.ndim)
        a_shape, b_shape, a_axes, b_axes = _shapes(contract, rank, w.shape, w_axes)
        fan_in = math.prod(a_shape[1:-1])
        a = jax.random.normal(jax.random.fold_in(key, i), a_shape, w.dtype) * (1.0 / math.sqrt(fan_in))
        b = jnp.zeros(b_shape, w.dtype)
        sharding = getattr(w, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            a = jax.device_put(a, jax.sharding.NamedSharding(sharding.mesh, _rank_spec(sharding.spec, contract, w.ndim, "a")))
            b = jax.device_put(b, jax.sharding.NamedSharding(sharding.mesh, _rank_spec(sharding.spec, contract, w.ndim, "b")))
        elif sharding is not None:
            a, b = jax.device_put(a, sharding), jax.device_put(b, sharding)
        with nnx.use_eager_sharding(False):  # placed above; no mesh context needed
            setattr(module, weight + SUFFIX, LoRA(a, b, a_axes, b_axes, scale, contract))
    return model


def abstract_adapters(cfg: ModelConfig, rank: int, targets, sharding: jax.sharding.Sharding | None = None) -> dict:
    """The adapters' pure-dict tree ({'blocks': {'attn': {'wq_lora': {'a', 'b'}}}}) as
    ShapeDtypeStructs (with `sharding`), for restoring a LoRA checkpoint's params."""
    from model.transformer import abstract_model

    _, state = abstract_model(cfg)
    params = nnx.to_pure_dict(state)
    tree: dict[str, Any] = {}
    for module_name, weight, contract in target_weights(cfg, parse_targets(targets)):
        w = params["blocks"][module_name][weight]
        a_shape, b_shape, _, _ = _shapes(contract, rank, w.shape, (None,) * len(w.shape))
        tree.setdefault("blocks", {}).setdefault(module_name, {})[weight + SUFFIX] = {
            "a": jax.ShapeDtypeStruct(a_shape, w.dtype, sharding=sharding),
            "b": jax.ShapeDtypeStruct(b_shape, w.dtype, sharding=sharding)}
    return tree


def split_params(params: dict) -> tuple[dict, dict]:
    """A model's pure-dict parameters -> (adapters, base): two nested dicts of the same layout,
    the first with only the `<weight>_lora` nodes, the second with everything else."""
    adapters, base = {}, {}
    for k, v in params.items():
        if k.endswith(SUFFIX):
            adapters[k] = v
        elif isinstance(v, dict):
            a, b = split_params(v)
            if a:
                adapters[k] = a
            if b or not a:
                base[k] = b
        else:
            base[k] = v
    return adapters, base


def join_params(base: dict, adapters: dict) -> dict:
    """The inverse of `split_params`: one nested dict with the base's and the adapters' leaves."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join_params(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def merge_adapters(base: dict, adapters: dict, scale: float) -> dict:
    """Fold the adapters into the weights: W + scale * A B for every adapted weight, in float32,
    back in W's dtype. `base` and the result are a plain model's pure-dict parameters."""
    out = dict(base)
    for k, v in adapters.items():
        if k.endswith(SUFFIX):
            name = k[: -len(SUFFIX)]
            w, a, b = base[name], v["a"], v["b"]
            r, ins, outs = a.shape[-1], a.shape[1:-1], b.shape[2:]  # a: (n_layers, *in, r), b: (n_layers, r, *out)
            delta = jnp.einsum("nir,nro->nio", a.reshape(a.shape[0], -1, r).astype(jnp.float32),
                               b.reshape(b.shape[0], r, -1).astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)  # (n_layers, prod(in), prod(out))
            delta = delta.reshape(a.shape[0], *ins, *outs)
            out[name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
        else:
            out[k] = merge_adapters(base[k], v, scale)
    return out


def lora_settings(config: dict) -> tuple[int, float, tuple[str, ...]] | None:
    """(rank, alpha, targets) from a resolved experiment config (plain dict, as saved in a
    checkpoint) when its run trained LoRA adapters, else None."""
    ft = config.get("finetune") or {}
    rank = int(ft.get("lora_rank", 0) or 0)
    if rank <= 0:
        return None
    return rank, float(ft.get("lora_alpha", 16.0)), parse_targets(ft.get("lora_targets", "q,k,v,o"))


def merged_model(model):
    """A plain `Transformer` (no adapters) whose weights are `model`'s with its adapters folded in:
    the same function up to float32 rounding, and what sampling, serving and export take."""
    from model.transformer import abstract_model

    adapters, base = split_params(nnx.to_pure_dict(nnx.state(model)))
    if not adapters:
        return model
    scale = next(m.scale for _, m in nnx.iter_graph(model) if isinstance(m, LoRA))
    graphdef, _ = abstract_model(model.cfg)
    return nnx.merge(graphdef, merge_adapters(base, adapters, scale))


def parse_base(init_from: str) -> tuple[str, int | None]:
    """finetune.init_from 'RUN_DIR' or 'RUN_DIR@STEP' -> (RUN_DIR, STEP or None: its latest)."""
    path, sep, step = str(init_from).rpartition("@")
    if sep and step.isdigit():
        return path, int(step)
    return str(init_from), None
