"""Logical-axis rule presets: the one place where logical names meet mesh axes.

Model code names only logical axes (`batch`, `seq`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `vocab`, `layers`); a preset maps each onto zero or more mesh axes (`data`, `fsdp`,
`tensor`, `sequence`, `stage`). Axes of size 1 make a rule a no-op, so one preset serves every
mesh shape. In every preset the stacked-layers axis `layers` maps to `stage`: with `stage > 1`
each pipeline stage holds its own layers (sharding/pipeline.py), with `stage = 1` it is a no-op.

    rules = rules_for("fsdp_tp")
    validate_state(abstract_state, mesh, rules)   # before anything compiles: ShardingError if not
"""

from __future__ import annotations

import math

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "stage")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


class ShardingError(ValueError):
    """A mesh, rule preset and model that do not fit together (named parameter, shape and axes)."""


def _preset(batch=("data", "fsdp"), seq=None, embed=None, tensor=False) -> Rules:
    t = "tensor" if tensor else None
    return (
        ("batch", batch), ("seq", seq), ("embed", embed), ("heads", t), ("kv_heads", t),
        ("head_dim", None), ("mlp", t), ("vocab", t), ("layers", "stage"),
    )


RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, the batch split over every data-like axis.
    "dp": _preset(),
    # ZeRO-3 style: parameters (and so optimizer state) sharded over fsdp along their embed
    # dimension and all-gathered per layer; the batch split over data and fsdp.
    "fsdp": _preset(embed="fsdp"),
    # fsdp plus Megatron tensor parallelism: heads, MLP hidden and vocabulary split over tensor.
    "fsdp_tp": _preset(embed="fsdp", tensor=True),
    # Tensor parallelism alone: parameters split over tensor only, replicated over data and fsdp.
    "tp": _preset(tensor=True),
    # fsdp plus sequence parallelism: activations split along the sequence over `sequence`;
    # attention all-gathers K/V across the sequence shards (model/transformer.py), so it is exact.
    "fsdp_sp": _preset(seq="sequence", embed="fsdp"),
}


def rules_for(preset: str) -> Rules:
    if preset not in RULE_PRESETS:
        raise ShardingError(f"mesh.rules={preset!r} is not one of {', '.join(RULE_PRESETS)}")
    return RULE_PRESETS[preset]


def mesh_axes_of(logical: str | None, rules: Rules) -> tuple[str, ...]:
    """The mesh axes a logical name maps to under `rules` (() for replicated)."""
    if logical is None:
        return ()
    table = dict(rules)
    if logical not in table:
        raise ShardingError(f"logical axis {logical!r} has no rule; known: {', '.join(table)}")
    target = table[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(axes: tuple[str | None, ...], rules: Rules) -> "jax.sharding.PartitionSpec":
    """Translate logical axis names to a PartitionSpec with the given rules (unknown name: error)."""
    from jax.sharding import PartitionSpec

    table = dict(rules)
    out = []
    for a in axes:
        mesh_axes_of(a, rules)  # raises for an unknown name
        out.append(None if a is None else table[a])
    return PartitionSpec(*out)


def check_divisible(name: str, shape: tuple[int, ...], axes: tuple[str | None, ...], mesh_shape: dict[str, int],
                    rules: Rules) -> None:
    """Every dimension must divide evenly over the mesh axes its logical name maps to."""
    for dim, (size, logical) in enumerate(zip(shape, axes)):
        targets = mesh_axes_of(logical, rules)
        n = math.prod(mesh_shape.get(a, 1) for a in targets)
        if n > 1 and size % n:
            sizes = " x ".join(f"{a}={mesh_shape.get(a, 1)}" for a in targets)
            raise ShardingError(
                f"{name} with shape {tuple(shape)} and logical axes {tuple(axes)}: dimension {dim} "
                f"({logical}={size}) does not divide over mesh axes {sizes} ({n} shards); "
                "change the model size, the mesh or mesh.rules"
            )


def validate_state(state, mesh_shape: dict[str, int], rules: Rules) -> None:
    """Check an (abstract) nnx State against a mesh and rules before anything compiles: every
    parameter's logical names are known, and each sharded dimension divides by its mesh axes.
    `mesh_shape` is {axis: size} (a `Mesh.shape`). Raises `ShardingError` naming the parameter."""
    import jax
    from flax import nnx

    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for path, var in leaves:
        if not isinstance(var, nnx.Variable):
            continue
        axes = var.get_metadata().get("out_sharding")
        if not axes:
            continue
        name = "".join(str(getattr(k, "key", k)) + "." for k in path).rstrip(".")
        if len(axes) != len(var.shape):
            raise ShardingError(f"{name} has shape {tuple(var.shape)} but {len(axes)} logical axes {tuple(axes)}")
        try:
            check_divisible(name, var.shape, tuple(axes), dict(mesh_shape), rules)
        except ShardingError as e:
            if "has no rule" in str(e):
                raise ShardingError(f"{name} with shape {tuple(var.shape)}: {e}") from None
            raise


def unused_mesh_axes(mesh_shape: dict[str, int], rules: Rules) -> list[str]:
    """Mesh axes of size > 1 that no rule maps to: their devices would only repeat the work."""
    used = {a for logical, _ in rules for a in mesh_axes_of(logical, rules)}
    return [a for a, n in mesh_shape.items() if n > 1 and a not in used]


def _active_mesh_and_rules():
    """The abstract mesh and logical-axis rules active while tracing (`jax.set_mesh` +
    `nnx.logical_axis_rules`), or None when either is absent (model code on one device)."""
    import jax
    from flax.core import spmd

    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    return mesh, rules


def with_logical_constraint(x, axes: tuple[str | None, ...]):
    """Constrain an activation's sharding by logical names under the active mesh and rules
    (`jax.set_mesh` + `nnx.logical_axis_rules`); a no-op when either is absent, so model code
    runs unchanged on one device."""
    import jax

    active = _active_mesh_and_rules()
    if active is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, active[1]))


def is_sharded(logical: str) -> bool:
    """Whether, under the active mesh and rules, the logical axis is split over a mesh axis of
    more than one device (False on one device)."""
    active = _active_mesh_and_rules()
    if active is None:
        return False
    mesh, rules = active
    return any(mesh.shape[a] > 1 for a in mesh_axes_of(logical, rules) if a in mesh.shape)
