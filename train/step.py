"""Pure training and evaluation steps: forward -> loss -> backward -> Optax update.

The NNX model is split once into a static `graphdef` and a pytree of parameters; the steps are
plain `jax.jit` functions of `(TrainState, batch)` with the state donated, which costs less per
step than `nnx.jit` (DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training. `rng` is raw key data (uint32) so it checkpoints as
    a plain array; dropout keys are derived from it and the step."""

    step: jax.Array  # () int32, optimizer steps taken
    params: Any  # nested dict of arrays (nnx pure dict)
    opt_state: Any
    rng: jax.Array
    # Parameters the model uses but training never changes (LoRA's base, train/lora.py), a nested
    # dict completing `params`; None when every parameter trains. No gradient or optimizer state.
    frozen: Any = None


def with_frozen(params, frozen):
    """The model's whole parameter tree: the trained `params` joined with the `frozen` ones."""
    if frozen is None:
        return params
    from model.lora import join_params

    return join_params(frozen, params)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> tuple[Any, TrainState]:
    """Split the model into (graphdef, TrainState)."""
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, opt_state, rng)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
    """Sum of token losses and the number of tokens. logits (B, L, V) float32, targets (B, L);
    weights (B, L): 0 for padding and, in chat data, for every token that is not the assistant's
    (the loss mask), so those targets reach neither the loss nor its gradient."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)  # (B, L)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    losses = lse - target_logit
    if weights is None:
        return losses.sum(), jnp.asarray(losses.size, jnp.float32)
    return (losses * weights).sum(), weights.sum()


def forward(model, batch: dict, dropout_key=None) -> jax.Array:
    """The model's logits (B, L, V) for a batch; packed chat batches carry `positions` (restarting
    at 0 per example) and `segment_ids` (B, L) so no example attends to another."""
    logits, _ = model(batch["inputs"], batch.get("positions"), segment_ids=batch.get("segment_ids"),
                      dropout_key=dropout_key)
    return logits


def _mean(total, count):
    # a batch whose weights are all 0 (chat data: only padding) has no loss, not NaN
    return total / jnp.maximum(count, 1.0)


def make_loss_fn(graphdef, splits: int = 1) -> Callable:
    """`loss_fn(params, batch, dropout_key[, frozen])`: mean token loss of the batch (differentiated
    with respect to `params` only; `frozen`: TrainState.frozen). With `splits > 1` the
    batch is cut along B into that many slices whose forward passes (and so backward passes) are
    separate in the graph: the loss is still the batch's total over its token count, but XLA may
    run the slices' ops concurrently (train.batch_splits, see train/config.py)."""
    def loss_fn(params, batch, dropout_key, frozen=None):
        model = nnx.merge(graphdef, with_frozen(params, frozen))
        if splits == 1:
            total, count = cross_entropy(forward(model, batch, dropout_key), batch["targets"], batch.get("weights"))
            return _mean(total, count)
        n, rest = divmod(batch["inputs"].shape[0], splits)
        if rest:
            raise ValueError(f"a batch of {batch['inputs'].shape[0]} sequences cannot be cut into {splits} "
                             "equal slices (train.batch_splits)")
        sums = []
        for i in range(splits):
            part = jax.tree.map(lambda x: x[i * n:(i + 1) * n], batch)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            sums.append(cross_entropy(forward(model, part, key), part["targets"], part.get("weights")))
        total, count = (functools.reduce(jnp.add, parts) for parts in zip(*sums))
        return _mean(total, count)
    return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, lr_schedule, grad_accum: int = 1,
                    dropout: bool = False, nonfinite_steps: tuple[int, ...] = (), batch_splits: int = 1) -> Callable:
    """Return a jitted `train_step(state, batch[, loss_limit]) -> (state, metrics)` (state donated).

    With `grad_accum > 1` the batch is split into that many micro-batches along B whose gradients
    are averaged in a `lax.scan`, so activation memory is that of one micro-batch. `batch_splits`
    cuts each (micro-)batch once more, side by side in one graph (`make_loss_fn`).

    Numerical guard: when the loss or any gradient is not finite, or the loss exceeds `loss_limit`
    (loss-spike skipping), the update is skipped: parameters and optimizer state are selected
    unchanged, bit for bit (multiplying the update by zero would keep NaN: NaN * 0 = NaN). The
    step counter still advances, so the data order stays that of an unguarded run.
    `metrics["nonfinite"]` and `metrics["skipped"]` are 1.0 on such steps. `nonfinite_steps`
    (testing only) makes the gradients NaN at those values of `state.step`.
    """
    loss_fn = make_loss_fn(graphdef, batch_splits)
    grad_fn = jax.value_and_grad(loss_fn)
    poison_steps = jnp.asarray(nonfinite_steps, jnp.int32) if nonfinite_steps else None

    def train_step(state: TrainState, batch: dict, loss_limit: jax.Array | None = None) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step) if dropout else None
        if grad_accum == 1:
            loss, grads = grad_fn(state.params, batch, key, state.frozen)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def accumulate(carry, xs):
                i, mb = xs
                k = None if key is None else jax.random.fold_in(key, i)
                loss, grads = grad_fn(state.params, mb, k, state.frozen)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
            loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
        if poison_steps is not None:
            poison = jnp.isin(state.step, poison_steps)
            loss, grads = jax.tree.map(lambda x: jnp.where(poison, jnp.nan, x), (loss, grads))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # one NaN/inf gradient makes the norm NaN/inf
        apply = finite if loss_limit is None else finite & (loss <= loss_limit)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # Select, never scale: the skipped branch returns the old arrays exactly.
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step),
                   "nonfinite": 1.0 - finite.astype(jnp.float32), "skipped": 1.0 - apply.astype(jnp.float32)}
        return TrainState(state.step + 1, params, opt_state, state.rng, state.frozen), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_step(graphdef) -> Callable:
    """Return a jitted `eval_step(params, batch[, frozen]) -> (loss_sum, token_count)`; batches may carry
    `weights` (0 for padding) so a whole split is averaged exactly."""
    def eval_step(params, batch, frozen=None):
        model = nnx.merge(graphdef, with_frozen(params, frozen))
        return cross_entropy(forward(model, batch), batch["targets"], batch.get("weights"))
    return jax.jit(eval_step)
