"""Pipeline parallelism: the stacked layers split into stages over the `stage` mesh axis, with a
GPipe schedule of microbatches.

The model's layers already live in one stacked parameter tree with a leading `layers` axis, and
every rule preset maps `layers` to the `stage` mesh axis, so stage s holds layers
[s * n/S, (s+1) * n/S). `run_stages` splits the batch into M microbatches and runs M + S - 1 ticks;
at tick t stage s applies its layers to microbatch t - s (a `vmap` over stages that GSPMD
partitions over `stage`, so each device group computes only its own stage), then every stage
hands its output to the next (a shift along the stage axis: one collective permute). The first
S - 1 and last S - 1 ticks are the pipeline's fill and drain bubble (fraction (S-1)/(M+S-1)).
Each example meets exactly the same layers in the same order as without a pipeline, so results
equal the unpipelined model; reverse-mode autodiff through the schedule gives GPipe's backward.

    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), pipeline_microbatches(8):
        logits, _ = model(tokens)      # model/transformer.py calls run_stages when stages > 1
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable

import jax
import jax.numpy as jnp

from sharding.rules import mesh_axes_of, with_logical_constraint

_MICROBATCHES: contextvars.ContextVar[int] = contextvars.ContextVar("pipeline_microbatches", default=0)


@contextlib.contextmanager
def pipeline_microbatches(n: int):
    """Microbatches per pipelined forward pass while tracing inside this block (0 = 2 * stages)."""
    token = _MICROBATCHES.set(n)
    try:
        yield
    finally:
        _MICROBATCHES.reset(token)


def _stage_axes() -> tuple[str, ...]:
    from flax.core import spmd

    rules = spmd.get_logical_axis_rules()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return ()
    return tuple(a for a in mesh_axes_of("layers", rules) if mesh.shape.get(a, 1) > 1)


def num_stages() -> int:
    """Pipeline stages under the active mesh and rules: the size of the mesh axes that the logical
    `layers` axis maps to (1 outside a mesh, or when `layers` is not sharded)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in _stage_axes()) if _stage_axes() else 1


def run_stages(block_fn: Callable, x: jax.Array, positions: jax.Array, layer_params, n_stages: int | None = None,
               n_microbatches: int | None = None) -> jax.Array:
    """Apply all layers to x with a GPipe schedule.

    block_fn(x, positions, layer_index, params) -> x applies one layer (params without the layers
    axis); x: (B, L, D); positions: (B, L); layer_params: pytree with a leading n_layers axis.
    """
    S = n_stages or num_stages()
    M = n_microbatches or _MICROBATCHES.get() or 2 * S
    B, L = positions.shape
    n_layers = jax.tree.leaves(layer_params)[0].shape[0]
    if n_layers % S:
        raise ValueError(f"n_layers={n_layers} must be divisible by the {S} pipeline stages")
    if B % M:
        raise ValueError(f"the batch of {B} rows must be divisible by {M} pipeline microbatches")
    per_stage, mb = n_layers // S, B // M

    # (n_layers, ...) -> (S, n_layers / S, ...): stage s's own layers, sharded over `stage`.
    stage_params = jax.tree.map(lambda p: p.reshape(S, per_stage, *p.shape[1:]), layer_params)
    stage_params = jax.tree.map(
        lambda p: with_logical_constraint(p, ("layers",) + (None,) * (p.ndim - 1)), stage_params)
    micro_x = with_logical_constraint(x.reshape(M, mb, *x.shape[1:]), (None, "batch", "seq", None))  # (M, mb, L, D)
    micro_pos = positions.reshape(M, mb, L)

    def stage_fn(h, pos, params, s):  # one stage: its layers in order. h: (mb, L, D)
        def body(h, xs):
            i, p = xs
            return block_fn(h, pos, s * per_stage + i, p), None
        h, _ = jax.lax.scan(body, h, (jnp.arange(per_stage), params))
        return h

    # spmd_axis_name: sharding constraints inside the layers keep the stage dimension on `stage`.
    all_stages = jax.vmap(stage_fn, spmd_axis_name=_stage_axes() or None)

    def tick(carry, t):
        buf, pos_buf, outputs = carry  # buf: (S, mb, L, D) each stage's output of the previous tick
        feed = jnp.minimum(t, M - 1)  # after the last microbatch, stage 0 computes a discarded bubble
        h_in = jnp.concatenate([micro_x[feed][None], buf[:-1]], axis=0)  # shift: stage s gets s-1's output
        p_in = jnp.concatenate([micro_pos[feed][None], pos_buf[:-1]], axis=0)
        h_in = with_logical_constraint(h_in, ("layers", "batch", "seq", None))
        out = all_stages(h_in, p_in, stage_params, jnp.arange(S))
        done = t - (S - 1)  # the microbatch leaving the last stage at this tick (< 0 while filling)
        outputs = jax.lax.cond(
            done >= 0,
            lambda o: jax.lax.dynamic_update_index_in_dim(o, out[S - 1], jnp.maximum(done, 0), 0),
            lambda o: o, outputs)
        return (out, p_in, outputs), None

    buf = jnp.zeros((S, mb, *x.shape[1:]), x.dtype)
    pos_buf = jnp.zeros((S, mb, L), positions.dtype)
    outputs = jnp.zeros_like(micro_x)
    (_, _, outputs), _ = jax.lax.scan(tick, (buf, pos_buf, outputs), jnp.arange(M + S - 1))
    return outputs.reshape(x.shape)
