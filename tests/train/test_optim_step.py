"""The optimizer (schedule, weight-decay mask) and the pure train step (accumulation, donation)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model import build_model, preset
from train.config import OptimConfig
from train.optim import decay_mask, learning_rate_schedule, make_optimizer
from train.step import cross_entropy, init_train_state, make_eval_step, make_train_step


def nanogpt_get_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
    """nanoGPT train.py's get_lr, verbatim in logic."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def test_schedule_is_nanogpts():
    sched = learning_rate_schedule(OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000), 2000)
    for it in (0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500):
        assert float(sched(it)) == pytest.approx(nanogpt_get_lr(it), rel=1e-5), it


def test_weight_decay_only_on_projection_matrices():
    cfg = preset("gpt2-nano", vocab_size=17, n_layers=2, d_model=16, n_heads=2)
    _, state = init_train_state(build_model(cfg), make_optimizer(OptimConfig(), 10), 0)
    mask = decay_mask(state.params)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = sorted(k for k, m in flat.items() if m)
    assert decayed == sorted(f"['blocks']['{a}']['{w}']" for a, w in [
        ("attn", "wq"), ("attn", "wk"), ("attn", "wv"), ("attn", "wo"), ("mlp", "w_up"), ("mlp", "w_down")])
    assert not flat["['embed']"] and not flat["['pos_embed']"]


def test_weight_decay_leaves_undecayed_params_alone():
    """With zero gradients, AdamW moves decayed params toward zero and leaves the rest exactly."""
    cfg = preset("gpt2-nano", vocab_size=17, n_layers=1, d_model=16, n_heads=2)
    tx = make_optimizer(OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0), 10)
    _, state = init_train_state(build_model(cfg), tx, 0)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = tx.update(zeros, state.opt_state, state.params)
    np.testing.assert_array_equal(updates["embed"], 0.0)
    np.testing.assert_array_equal(updates["final_norm"]["scale"], 0.0)
    assert float(jnp.abs(updates["blocks"]["mlp"]["w_up"]).max()) > 0


def batch_for(cfg, B=8, L=16, seed=0):
    x = jax.random.randint(jax.random.key(seed), (B, L + 1), 0, cfg.vocab_size, dtype=jnp.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def test_gradient_accumulation_equals_one_big_batch():
    cfg = preset("llama-tiny", vocab_size=31, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=0)
    results = []
    for accum in (1, 4):
        # Plain SGD keeps the update linear in the gradient; Adam's first step (g / |g|) would
        # magnify float32 rounding of near-zero gradient entries.
        tx = optax.sgd(1.0)
        graphdef, state = init_train_state(build_model(cfg, seed=0), tx, 0)
        step = make_train_step(graphdef, tx, learning_rate_schedule(ocfg, 10), grad_accum=accum)
        state, metrics = step(state, batch_for(cfg))
        results.append((state.params, float(metrics["loss"])))
    (p1, l1), (p4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-6)
    # float32: micro-batch means are summed in another order.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p4)


@pytest.mark.parametrize("weighted", [False, True])
def test_batch_splits_equal_one_batch(weighted):
    """train.batch_splits: slices side by side give the batch's loss (total over its token count,
    also with padding weights that differ between slices) and its update."""
    cfg = preset("gpt2-nano", vocab_size=31, n_layers=2, d_model=32, n_heads=2)
    ocfg = OptimConfig(lr=1e-2, warmup_steps=0)
    batch = batch_for(cfg)
    if weighted:  # the first slice's rows are mostly padding: a mean of slice means would be wrong
        batch["weights"] = jnp.where(jnp.arange(8)[:, None] < 4, jnp.arange(16)[None] < 3, 1).astype(jnp.float32)
    results = []
    for splits in (1, 2, 4):
        tx = optax.sgd(1.0)
        graphdef, state = init_train_state(build_model(cfg, seed=0), tx, 0)
        step = make_train_step(graphdef, tx, learning_rate_schedule(ocfg, 10), batch_splits=splits)
        state, metrics = step(state, batch)
        results.append((state.params, float(metrics["loss"])))
    (p1, l1), *rest = results
    for p, loss in rest:
        assert loss == pytest.approx(l1, rel=1e-6)
        # float32: the slices' sums are added in another order.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p1, p)
    graphdef, state = init_train_state(build_model(cfg, seed=0), optax.sgd(1.0), 0)
    step = make_train_step(graphdef, optax.sgd(1.0), learning_rate_schedule(ocfg, 10), batch_splits=3)
    with pytest.raises(ValueError, match="batch of 8 sequences cannot be cut into 3"):
        step(state, batch)


def test_train_step_donates_the_state_and_counts_steps():
    cfg = preset("gpt2-nano", vocab_size=17, n_layers=1, d_model=16, n_heads=2)
    ocfg = OptimConfig()
    tx = make_optimizer(ocfg, 10)
    graphdef, state = init_train_state(build_model(cfg), tx, 0)
    step = make_train_step(graphdef, tx, learning_rate_schedule(ocfg, 10))
    old_embed = state.params["embed"]
    new, metrics = step(state, batch_for(cfg))
    assert int(new.step) == 1 and set(metrics) == {"loss", "grad_norm", "lr", "nonfinite", "skipped"}
    assert float(metrics["nonfinite"]) == 0.0 and float(metrics["skipped"]) == 0.0  # the guard let it through
    assert old_embed.is_deleted()  # the buffer was donated to the update


def test_eval_step_weights_exclude_padding():
    cfg = preset("gpt2-nano", vocab_size=17, n_layers=1, d_model=16, n_heads=2)
    graphdef, state = init_train_state(build_model(cfg), make_optimizer(OptimConfig(), 10), 0)
    evaluate = make_eval_step(graphdef)
    b = batch_for(cfg, B=2)
    weights = jnp.ones((2, 16)).at[1].set(0.0)
    total, count = evaluate(state.params, {**b, "weights": weights})
    first_only, n = evaluate(state.params, {k: v[:1] for k, v in b.items()})
    assert float(count) == 16.0 and float(n) == 16.0
    assert float(total) == pytest.approx(float(first_only), rel=1e-6)


def test_cross_entropy_matches_log_softmax():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
    targets = jnp.array([[0, 3, 6], [1, 1, 2]])
    total, count = cross_entropy(logits, targets)
    ref = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()
    assert float(count) == 6 and float(total) == pytest.approx(float(ref), rel=1e-6)
