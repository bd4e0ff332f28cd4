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
