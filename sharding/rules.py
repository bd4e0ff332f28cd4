"""Logical-axis rule presets: the one place where logical names meet mesh axes.

Model code names only logical axes (`batch`, `seq`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `vocab`, `layers`); a preset maps each onto zero or more mesh axes (`data`, `fsdp`,
`tensor`, `sequence`, `stage`). Axes of size 1 make a rule a no-op, so one preset serves every
mesh shape.
"""

from __future__ import annotations

LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor", "sequence", "stage")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

RULE_PRESETS: dict[str, Rules] = {
    # Pure data parallelism: parameters replicated, the batch split over every data-like axis.
    "dp": (
        ("batch", ("data", "fsdp")), ("seq", None), ("embed", None), ("heads", None),
        ("kv_heads", None), ("head_dim", None), ("mlp", None), ("vocab", None), ("layers", None),
    ),
    # ZeRO-3 style: parameters sharded over fsdp along their embed dimension, gathered per layer.
    "fsdp": (
        ("batch", ("data", "fsdp")), ("seq", None), ("embed", "fsdp"), ("heads", "tensor"),
        ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("vocab", "tensor"), ("layers", None),
    ),
}


def rules_for(preset: str) -> Rules:
    if preset not in RULE_PRESETS:
        raise ValueError(f"mesh.rules={preset!r} is not one of {', '.join(RULE_PRESETS)}")
    return RULE_PRESETS[preset]


def logical_to_spec(axes: tuple[str | None, ...], rules: Rules) -> "jax.sharding.PartitionSpec":
    """Translate logical axis names to a PartitionSpec with the given rules (unknown name: error)."""
    from jax.sharding import PartitionSpec

    table = dict(rules)
    out = []
    for a in axes:
        if a is not None and a not in table:
            raise ValueError(f"logical axis {a!r} has no rule; known: {', '.join(table)}")
        out.append(None if a is None else table[a])
    return PartitionSpec(*out)


def with_logical_constraint(x, axes: tuple[str | None, ...]):
    """Constrain an activation's sharding by logical names under the active mesh and rules
    (`jax.set_mesh` + `nnx.logical_axis_rules`); a no-op when either is absent, so model code
    runs unchanged on one device."""
    import jax
    from flax.core import spmd

    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))
