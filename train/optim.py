"""The optimizer: AdamW with nanoGPT's warmup + cosine schedule, global-norm clipping, and no
weight decay on norms, biases and embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from train.config import OptimConfig

# Parameters that weight decay applies to: the projection matrices. Everything else (embeddings,
# position embeddings, norm scales and biases) is left undecayed. Matched by name because stacked
# layers give biases and norm scales a leading `layers` axis, so "ndim >= 2" would not tell them apart.
DECAYED = frozenset({"wq", "wk", "wv", "wo", "w_up", "w_gate", "w_down", "lm_head"})


def learning_rate_schedule(cfg: OptimConfig, total_steps: int):
    """nanoGPT's get_lr: linear warmup lr * (step + 1) / (warmup + 1), then cosine from lr to
    min_lr over [warmup, decay_steps), then min_lr. `step` is the 0-based optimizer step."""
    decay_steps = cfg.decay_steps or total_steps
    warmup = cfg.warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = cfg.lr * (step + 1) / (warmup + 1)
        ratio = jnp.clip((step - warmup) / max(decay_steps - warmup, 1), 0.0, 1.0)
        cosine = cfg.min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)
        return jnp.where(step < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """A pytree of bools, True where weight decay applies (see DECAYED)."""
    def is_decayed(path, _):
        return getattr(path[-1], "key", None) in DECAYED
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2,
                             eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
