"""Sharded training equals single-device training: for every rule preset on the meshes it is meant
for, the loss of each of 3 steps and every gradient after them match a single-device run within
1e-5 relative (float32: per element, with an absolute floor of 1e-5 x the tensor's largest
gradient so that elements that are nearly zero compare on the tensor's scale), and the parameters are laid out as the golden specs below say."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from model.config import preset
from model.transformer import build_model, state_shardings
from sharding.mesh import make_mesh
from sharding.pipeline import pipeline_microbatches
from sharding.rules import rules_for, validate_state
from train.config import MeshConfig
from train.step import make_loss_fn

RTOL = 1e-5  # float32: sharded reductions only change the summation order
# One tiny Llama-style model (GQA, SwiGLU, RoPE, untied head) for every case; 4 layers so that
# stage=4 has one layer per stage. B=16 rows split into 4 microbatches divide every mesh below.
MODEL = preset("llama-tiny", vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16,
               n_layers=4, scan_layers=True)
B, L, STEPS = 16, 16, 3
LR = 0.5  # plain SGD: large enough that 3 steps move the parameters well away from the start

# Each mesh of the issue, paired with the presets meant for it. Every preset runs on any mesh
# (a rule onto a size-1 axis is a no-op, an unused axis just repeats work), so the full 5 x 7
# grid would mostly re-test the same layout; these pairs cover each mesh and each preset, and
# each preset on a mesh where its rules actually shard something:
#   data=8                   dp       the batch over 8 (dp on fsdp=8 would be the same layout)
#   fsdp=8                   fsdp     parameters split 8 ways along embed
#   fsdp=4 x tensor=2        fsdp_tp  2-D parameter sharding;  tp: tensor parallelism, fsdp as batch
#   data=2 x fsdp=2 x tensor=2  fsdp_tp: three axes at once (tp here would repeat tp's case above:
#                            the batch over 4 devices, heads over 2)
#   fsdp=2 x sequence=4      fsdp_sp  activations split along the sequence (K/V all-gathered)
#   stage=2 (data=4)         dp       a 2-stage pipeline, 4 microbatches, data parallel inside
#   stage=4 (fsdp=2)         fsdp     a 4-stage pipeline, 4 microbatches, fsdp inside
CASES = [
    (dict(data=8), "dp"),
    (dict(data=1, fsdp=8), "fsdp"),
    (dict(data=1, fsdp=4, tensor=2), "fsdp_tp"),
    (dict(data=1, fsdp=4, tensor=2), "tp"),
    (dict(data=2, fsdp=2, tensor=2), "fsdp_tp"),
    (dict(data=1, fsdp=2, sequence=4), "fsdp_sp"),
    (dict(data=4, stage=2, microbatches=4), "dp"),
    (dict(data=1, fsdp=2, stage=4, microbatches=4), "fsdp"),
]

# Golden parameter layouts (PartitionSpec per parameter, trailing None dropped). Stacked block
# parameters lead with the `layers` axis, which every preset puts on `stage`.
_B = "blocks."
GOLDEN = {
    "dp": {
        "embed": (), "lm_head": (), "final_norm.scale": (),
        _B + "attn.wq": ("stage",), _B + "attn.wk": ("stage",), _B + "attn.wv": ("stage",),
        _B + "attn.wo": ("stage",), _B + "attn_norm.scale": ("stage",), _B + "mlp_norm.scale": ("stage",),
        _B + "mlp.w_gate": ("stage",), _B + "mlp.w_up": ("stage",), _B + "mlp.w_down": ("stage",),
    },
    "fsdp": {
        "embed": (None, "fsdp"), "lm_head": ("fsdp",), "final_norm.scale": ("fsdp",),
        _B + "attn.wq": ("stage", "fsdp"), _B + "attn.wk": ("stage", "fsdp"), _B + "attn.wv": ("stage", "fsdp"),
        _B + "attn.wo": ("stage", None, None, "fsdp"), _B + "attn_norm.scale": ("stage", "fsdp"),
        _B + "mlp_norm.scale": ("stage", "fsdp"), _B + "mlp.w_gate": ("stage", "fsdp"),
        _B + "mlp.w_up": ("stage", "fsdp"), _B + "mlp.w_down": ("stage", None, "fsdp"),
    },
    "fsdp_tp": {
        "embed": ("tensor", "fsdp"), "lm_head": ("fsdp", "tensor"), "final_norm.scale": ("fsdp",),
        _B + "attn.wq": ("stage", "fsdp", "tensor"), _B + "attn.wk": ("stage", "fsdp", "tensor"),
        _B + "attn.wv": ("stage", "fsdp", "tensor"), _B + "attn.wo": ("stage", "tensor", None, "fsdp"),
        _B + "attn_norm.scale": ("stage", "fsdp"), _B + "mlp_norm.scale": ("stage", "fsdp"),
        _B + "mlp.w_gate": ("stage", "fsdp", "tensor"), _B + "mlp.w_up": ("stage", "fsdp", "tensor"),
        _B + "mlp.w_down": ("stage", "tensor", "fsdp"),
    },
    "tp": {
        "embed": ("tensor",), "lm_head": (None, "tensor"), "final_norm.scale": (),
        _B + "attn.wq": ("stage", None, "tensor"), _B + "attn.wk": ("stage", None, "tensor"),
        _B + "attn.wv": ("stage", None, "tensor"), _B + "attn.wo": ("stage", "tensor"),
        _B + "attn_norm.scale": ("stage",), _B + "mlp_norm.scale": ("stage",),
        _B + "mlp.w_gate": ("stage", None, "tensor"), _B + "mlp.w_up": ("stage", None, "tensor"),
        _B + "mlp.w_down": ("stage", "tensor"),
    },
}
GOLDEN["fsdp_sp"] = GOLDEN["fsdp"]  # sequence parallelism shards activations, not parameters


def batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MODEL.vocab_size, size=(STEPS + 1, B, L + 1), dtype=np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def flat(tree) -> dict:
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def spec_of(array) -> tuple:
    spec = tuple(getattr(array.sharding, "spec", ()))
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def initial_model():
    """graphdef, abstract state (with logical-axis metadata) and host parameters, built once."""
    model = build_model(MODEL, seed=0)
    graphdef, state = nnx.split(model)
    return graphdef, jax.eval_shape(lambda: state), jax.device_get(nnx.to_pure_dict(state))


def train_three_steps(model, mesh=None, rules=None, microbatches=0):
    """(losses, gradients after the steps, parameter specs) of STEPS SGD steps, on `mesh` or on one device.

    The parameters are placed with `state_shardings` (what `build_model` gives its jitted
    initializer as out_shardings), so each case compiles only one function: the loss, gradients
    and update. The real `make_train_step` (AdamW, clipping, schedule) runs sharded in the
    Trainer tests of this folder (CLI on fsdp x tensor, checkpoints onto other meshes)."""
    import contextlib

    graphdef, abstract, host_params = model
    ctx = contextlib.ExitStack()
    if mesh is None:
        params = jax.device_put(host_params, jax.devices()[0])
    else:
        ctx.enter_context(jax.set_mesh(mesh))
        ctx.enter_context(nnx.logical_axis_rules(rules))
        ctx.enter_context(pipeline_microbatches(microbatches))
        validate_state(abstract, mesh.shape, rules)
        params = jax.device_put(host_params, nnx.to_pure_dict(state_shardings(abstract, mesh, rules)))
    specs = {name: spec_of(p) for name, p in flat(params).items()}
    with ctx:
        loss_and_grads = jax.value_and_grad(make_loss_fn(graphdef))

        @jax.jit
        def sgd_step(params, batch):
            loss, grads = loss_and_grads(params, batch, None)
            return jax.tree.map(lambda p, g: p - LR * g, params, grads), loss, grads

        losses = []
        for batch in batches():  # STEPS updates, then the gradient at the parameters they reached
            new_params, loss, grads = sgd_step(params, batch)
            losses.append(float(loss))
            if len(losses) <= STEPS:
                params = new_params
    return np.array(losses), jax.device_get(flat(grads)), specs


@pytest.fixture(scope="module")
def model():
    return initial_model()


@pytest.fixture(scope="module")
def single_device(model):
    return train_three_steps(model)


@pytest.mark.parametrize("sizes,preset_name", CASES,
                         ids=[f"{p}-" + "x".join(f"{k}{v}" for k, v in s.items()) for s, p in CASES])
def test_sharded_training_matches_single_device(model, single_device, sizes, preset_name):
    ref_losses, ref_grads, _ = single_device
    sizes = dict(sizes)
    microbatches = sizes.pop("microbatches", 0)
    cfg = dataclasses.replace(MeshConfig(**sizes), rules=preset_name).validate()
    mesh = make_mesh(cfg)
    losses, grads, specs = train_three_steps(model, mesh, rules_for(preset_name), microbatches)

    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[name], rtol=RTOL, atol=RTOL * np.abs(ref_grads[name]).max(),
                                   err_msg=name)
    assert specs == GOLDEN[preset_name]
