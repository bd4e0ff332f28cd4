"""Sampling and serving a model split over the devices of one host (tensor parallelism over heads,
the KV cache split over KV heads, the engine's slots over `data`).

    layout = serving_layout(cfg, "fsdp=2,tensor=4", "fsdp_tp", slots=8)  # ShardingError if it cannot split
    loaded = load_for_inference(run, mesh=layout.mesh, rules=layout.rules)  # each device reads its shards
    Engine(loaded.model, loaded.tokenizer, slots=8, layout=layout)          # or Sampler(model, layout=layout)

A `Layout` is a mesh and a logical-axis rule preset (sharding/rules.py), the same vocabulary
training uses. It is a static argument of the sampler's and the engine's jitted programs (one
program per layout): inside them it is entered while tracing, so the model's own
`with_logical_constraint`s resolve, and the KV cache (and the engine's per-slot state) is
constrained to its logical axes with concrete NamedShardings, so every output stays split over the
mesh; only the sampled ids (and logprobs) come back to the host.

KV-cache logical axes: k (layers, B, K, S, Dh) -> (None, batch, kv_heads, None, head_dim), v (layers,
B, K, Dh, S) -> (None, batch, kv_heads, head_dim, None), positions (B, S) -> (batch, None), index
(B,) -> (batch,). A batch that does not divide over the batch axes (one prompt, the engine's
prefill of one request) is replicated over them instead (`Layout.for_batch`).

Fewer KV heads than the tensor axis is an error, not a replication of the KV heads: the serving
plan (sharding.plan.serving_plan) names what would work. Multi-host serving is not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types

import jax
from jax.sharding import Mesh, NamedSharding

from sharding.rules import MESH_AXES, Rules, ShardingError, logical_to_spec, mesh_axes_of, unused_mesh_axes

CACHE_AXES = types.MappingProxyType({  # read-only: no mutable module state in infer/
    "k": (None, "batch", "kv_heads", None, "head_dim"),  # (layers, B, K, S, Dh); per-layer caches: [1:] each
    "v": (None, "batch", "kv_heads", "head_dim", None),  # (layers, B, K, Dh, S)
    "positions": ("batch", None),  # (B, S)
    "index": ("batch",),  # (B,) per row; a shared () index is replicated
})
SERVING_AXES = ("data", "fsdp", "tensor")  # sequence and stage are training's (no cached path over them)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh and the logical-axis rules inference programs run under (hashable: a static jit argument)."""

    mesh: Mesh
    rules: Rules

    @property
    def batch_shards(self) -> int:
        """How many devices the `batch` axis (a batch of prompts, the engine's slots) splits over."""
        return math.prod(self.mesh.shape[a] for a in mesh_axes_of("batch", self.rules))

    def for_batch(self, batch: int) -> "Layout":
        """This layout for a batch of `batch` rows: rows replicated when they do not divide."""
        if batch % self.batch_shards == 0:
            return self
        return dataclasses.replace(self, rules=tuple((k, None if k == "batch" else v) for k, v in self.rules))

    def sharding(self, axes: tuple[str | None, ...]) -> NamedSharding:
        return NamedSharding(self.mesh, logical_to_spec(axes, self.rules))

    def constrain(self, x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        """x constrained to its logical axes (a concrete sharding: works in a program with no sharded input)."""
        return jax.lax.with_sharding_constraint(x, self.sharding(axes))

    def describe(self) -> str:
        sizes = ",".join(f"{a}={n}" for a, n in self.mesh.shape.items() if n > 1) or "one device"
        return f"{sizes} ({math.prod(self.mesh.shape.values())} devices)"


def tracing(layout: Layout | None):
    """While tracing a program: the layout's abstract mesh and rules active (model code's logical
    constraints resolve); nothing on one device (layout None)."""
    if layout is None:
        return contextlib.nullcontext()
    from flax import nnx

    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(layout.mesh.abstract_mesh))
    stack.enter_context(nnx.logical_axis_rules(layout.rules))
    return stack


def constrain_cache(cache, layout: Layout | None):
    """A KVCache with every field constrained to CACHE_AXES (unchanged without a layout)."""
    if layout is None:
        return cache
    layout = layout.for_batch(cache.batch)

    def constrain(name, x):
        if isinstance(x, tuple):  # a per-layer cache's k or v: each layer without the layers axis
            return tuple(layout.constrain(layer, CACHE_AXES[name][1:]) for layer in x)
        return layout.constrain(x, CACHE_AXES[name][:x.ndim])

    return dataclasses.replace(cache, **{name: constrain(name, getattr(cache, name)) for name in CACHE_AXES})


def constrain_rows(x: jax.Array, layout: Layout | None) -> jax.Array:
    """A per-row array (B, ...) split over the batch axes, the rest replicated."""
    if layout is None:
        return x
    return layout.for_batch(x.shape[0]).constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def check_serving(cfg, sizes: dict[str, int], rules: Rules, slots: int | None = None) -> None:
    """ShardingError naming the numbers when model config `cfg` cannot be served on a mesh of
    these axis sizes with `rules` and `slots` engine slots (None: a sampler, any batch): heads or
    KV heads that do not split over what they map to, slots that do not split over the batch axes,
    a mesh axis serving does not use, or one the rules leave idle."""
    from sharding.plan import serving_plan

    unused = [a for a in MESH_AXES if a not in SERVING_AXES and sizes.get(a, 1) > 1]
    if unused:
        raise ShardingError(f"--mesh {', '.join(f'{a}={sizes[a]}' for a in unused)}: serving splits over "
                            f"{', '.join(SERVING_AXES)} only (sequence and stage are for training)")
    idle = unused_mesh_axes({a: sizes.get(a, 1) for a in MESH_AXES}, rules)
    if idle:
        raise ShardingError(f"no rule maps a logical axis to mesh axis {', '.join(idle)}, so its devices would only "
                            "repeat the same work; use rules that split it (tp or fsdp_tp for tensor)")
    batch_shards = math.prod(sizes.get(a, 1) for a in mesh_axes_of("batch", rules))
    serving_plan(cfg, sizes, rules, dtype="float32", slots=slots or batch_shards, context=cfg.max_seq_len)


def serving_layout(cfg, mesh: str | dict[str, int], rules: str = "fsdp_tp", slots: int | None = None,
                   devices=None) -> Layout:
    """The Layout for serving model config `cfg` on `mesh` ('tensor=8', 'fsdp=2,tensor=4', or
    {axis: size}) with the named rule preset, checked first (`check_serving`); the mesh takes the
    first prod(sizes) devices (or `devices`). ShardingError with one line saying what would work."""
    from sharding.mesh import mesh_from_sizes, parse_mesh
    from sharding.rules import rules_for

    sizes = parse_mesh(mesh) if isinstance(mesh, str) else {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    preset = rules_for(rules)
    check_serving(cfg, sizes, preset, slots)
    return Layout(mesh_from_sizes(sizes, devices), preset)


def load_sharded(path, step: int | None, mesh: str | dict[str, int], rules: str = "fsdp_tp",
                 slots: int | None = None):
    """(LoadedModel, Layout): checkpoint `path` loaded straight onto the mesh. The mesh is checked
    against the checkpoint's model config (read alone, a small JSON item) before any parameter is
    read. Raises ShardingError (the mesh cannot split the model), FileNotFoundError, ConfigError."""
    from model.checkpoint import load_for_inference, read_checkpoint_meta
    from model.config import model_config_from_dict

    step, config, _ = read_checkpoint_meta(path, step)
    kernels = {"attention": "xla", "matmul": "xla", "norm_impl": "xla"}  # as load_for_inference: no kernel checks
    cfg = model_config_from_dict({**config.get("model", {}), **kernels}).validate()
    layout = serving_layout(cfg, mesh, rules, slots)
    return load_for_inference(path, step, mesh=layout.mesh, rules=layout.rules), layout
