"""Sharded inference (infer/sharded.py): a checkpoint written from one mesh loads straight onto
another, and greedy samples and the engine's outputs are token-identical to one device on meshes
tensor=2, tensor=4, fsdp=2+tensor=2 and data=2+tensor=2 (the slots over data), each compiled once;
the parameters and the KV cache are really split (each device holds 1/tensor of the heads); a mesh
that cannot split the model is one line naming the numbers, before anything loads.

The model is a Llama-style GQA model (8 heads, 4 KV heads, RoPE, RMSNorm, SwiGLU) with a large
init_std, so its logits are far from uniform and greedy choices do not hinge on the float32
rounding that a split matmul's different summation order brings.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
from flax import nnx

from infer import cli
from infer.engine import Engine, SamplingOptions
from infer.sampler import Sampler
from infer.sharded import CACHE_AXES, Layout, load_sharded, serving_layout
from model import build_model, preset
from model.checkpoint import load_for_inference, save_model
from model.tokenizer import CharTokenizer
from sharding.mesh import mesh_from_sizes, parse_mesh
from sharding.rules import ShardingError, rules_for

MODEL = dict(vocab_size=64, n_layers=2, d_model=64, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=32, init_std=0.5)
CFG = preset("llama-tiny", **MODEL)
TOK = CharTokenizer("".join(chr(c) for c in range(48, 112)))  # '0'..'o': 64 characters, ids 0..63
PROMPTS = [[40, 37], [5], list(range(10, 22)), [60, 13, 7, 33, 41, 50, 3], list(range(40, 51)),
           [26] * 9, list(range(1, 18)), [17, 63, 11]]
MAX_TOKENS = [6, 8, 10, 12, 14, 15, 11, 13]  # ragged; the longest prompt (17) + the most (15) = the context, 32
MESHES = ["tensor=2", "tensor=4", "fsdp=2,tensor=2", "data=2,tensor=2"]
SLOTS = 4  # fewer than the requests: some wait and join mid-batch


def compile_counter():
    """A list that collects every trace and compile from now on, and the function that stops it."""
    events = []

    def listener(event, duration, **kwargs):
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/core/compile/jaxpr_trace_duration"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def engine_outputs(engine):
    """Every request submitted at once (more than the slots), greedy; the ids of each, in order."""
    results, done = {}, threading.Semaphore(0)
    for i, (p, n) in enumerate(zip(PROMPTS, MAX_TOKENS)):
        ids = []

        def on_event(e, i=i, ids=ids):
            ids.extend(e.token_ids)
            if e.finish_reason is not None:
                results[i] = ids
                done.release()

        engine.submit(p, SamplingOptions(max_tokens=n, temperature=0), on_event)
    for _ in PROMPTS:
        assert done.acquire(timeout=300)
    return [results[i] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory whose checkpoint was written from a model built on mesh fsdp=2,tensor=2."""
    mesh = mesh_from_sizes(parse_mesh("fsdp=2,tensor=2"))
    model = build_model(CFG, seed=0, mesh=mesh, rules=rules_for("fsdp_tp"))
    assert model.blocks.attn.wq[...].sharding.shard_shape((2, 64, 8, 8)) == (2, 32, 4, 8)  # really split
    path = tmp_path_factory.mktemp("sharded") / "run"
    config = {"model": {"preset": "llama-tiny", **MODEL}}
    save_model(path / "checkpoints", 1, nnx.to_pure_dict(nnx.state(model)), config, TOK.to_json())
    return path


@pytest.fixture(scope="module")
def reference(run):
    """Greedy samples and engine outputs on one device, from the checkpoint written on a mesh."""
    loaded = load_for_inference(run)
    assert len(loaded.model.embed[...].sharding.device_set) == 1
    # resharding on load is exact: the same parameters as a model built on one device with the same seed
    same = jax.tree.map(np.array_equal, nnx.to_pure_dict(nnx.state(loaded.model)),
                        nnx.to_pure_dict(nnx.state(build_model(CFG, seed=0))))
    assert all(jax.tree.leaves(same))
    samples = Sampler(loaded.model).generate(PROMPTS, max_new_tokens=MAX_TOKENS, temperature=0)
    engine = Engine(loaded.model, TOK, slots=SLOTS, name="one-device")
    engine.start()
    try:
        outputs = engine_outputs(engine)
    finally:
        engine.shutdown(grace_s=5)
    assert [len(s) for s in samples] == MAX_TOKENS
    assert outputs == samples  # the engine's continuous batching and the sampler agree on one device
    assert len({tuple(s) for s in samples}) == len(samples)  # the rows really differ
    return samples


@pytest.fixture(scope="module", params=MESHES)
def served(request, run):
    """(mesh text, model, layout, sampler, started engine): the checkpoint loaded onto the mesh."""
    mesh = request.param
    (_, model, tokenizer, _), layout = load_sharded(run, None, mesh, "fsdp_tp", slots=SLOTS)
    engine = Engine(model, tokenizer, slots=SLOTS, name=mesh, layout=layout)
    engine.start()
    yield mesh, model, layout, Sampler(model, layout=layout), engine
    engine.shutdown(grace_s=5)


def test_mesh_samples_and_serves_token_identical_to_one_device_compiled_once(served, reference):
    mesh, _, layout, sampler, engine = served
    assert layout.mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1, "stage": 1, **parse_mesh(mesh)}
    assert sampler.generate(PROMPTS, max_new_tokens=MAX_TOKENS, temperature=0) == reference
    compiles, stop = compile_counter()
    try:
        # other prompts of the same shapes: the sampler's program is reused; the engine compiled at start
        swapped = sampler.generate(PROMPTS[::-1], max_new_tokens=MAX_TOKENS[::-1], temperature=0)
        outputs = engine_outputs(engine)
        assert compiles == []
    finally:
        stop()
    assert swapped == reference[::-1]
    assert outputs == reference


def shard_shapes(x) -> set:
    return {s.data.shape for s in x.addressable_shards}


def test_parameters_and_kv_cache_are_split_not_replicated(served):
    mesh, model, layout, _, engine = served
    sizes = parse_mesh(mesh)
    t, f, rows = sizes["tensor"], sizes["fsdp"], sizes["data"] * sizes["fsdp"]  # batch -> (data, fsdp)
    n_devices = t * rows
    L, D, H, K, Dh, S = CFG.n_layers, CFG.d_model, CFG.n_heads, CFG.kv_heads, CFG.head_dim, CFG.max_seq_len
    attn = model.blocks.attn
    # each device holds 1/tensor of the query heads and of the KV heads (and 1/fsdp of the embedding)
    assert shard_shapes(attn.wq[...]) == {(L, D // f, H // t, Dh)}
    assert shard_shapes(attn.wk[...]) == {(L, D // f, K // t, Dh)}
    assert shard_shapes(attn.wo[...]) == {(L, H // t, Dh, D // f)}
    assert len({s.device for s in attn.wq[...].addressable_shards}) == n_devices
    assert shard_shapes(engine._layers[0]["attn"]["wk"]) == {(D // f, K // t, Dh)}  # the per-layer weights too
    engine_outputs(engine)  # the state after prefills and decode steps, not only the initial one
    cache = engine._state.cache
    # the KV cache: slots over data (and fsdp), KV heads over tensor; one distinct block per device
    assert cache.per_layer and len(cache.k) == len(cache.v) == L  # the engine's cache: one buffer per layer
    for k, v in zip(cache.k, cache.v):
        assert k.shape == (SLOTS, K, S, Dh) and v.shape == (SLOTS, K, Dh, S)
        assert shard_shapes(k) == {(SLOTS // rows, K // t, S, Dh)}
        assert shard_shapes(v) == {(SLOTS // rows, K // t, Dh, S)}
        for x, name in ((k, "k"), (v, "v")):
            assert len({s.device for s in x.addressable_shards}) == n_devices
            # as CACHE_AXES says, without its leading layers axis
            assert x.sharding.is_equivalent_to(layout.sharding(CACHE_AXES[name][1:]), x.ndim)
    assert shard_shapes(cache.positions) == {(SLOTS // rows, S)}
    assert shard_shapes(engine._state.seen) == {(SLOTS // rows, CFG.vocab_size)}


def test_a_mesh_that_cannot_split_the_model_is_one_line_naming_the_numbers():
    with pytest.raises(ShardingError, match=r"4 KV heads do not split over 8 devices.*1, 2, 4"):
        serving_layout(CFG, "tensor=8")
    with pytest.raises(ShardingError, match=r"--slots=3 does not divide over the 2 devices.*multiple of 2"):
        serving_layout(CFG, "data=2,tensor=2", slots=3)
    with pytest.raises(ShardingError, match=r"stage=2: serving splits over data, fsdp, tensor only"):
        serving_layout(CFG, "stage=2")
    with pytest.raises(ShardingError, match=r"mesh axis tensor, so its devices would only repeat the same work"):
        serving_layout(CFG, "tensor=2", rules="dp")
    with pytest.raises(ShardingError, match=r"needs 16 devices but 8 are visible"):
        serving_layout(CFG, "data=16")
    with pytest.raises(ShardingError, match=r"'tensor=two' must be AXIS=N"):
        serving_layout(CFG, "tensor=two")
    mha = preset("llama-tiny", **{**MODEL, "n_kv_heads": 0, "n_heads": 2, "d_model": 64})  # 2 heads
    with pytest.raises(ShardingError, match=r"2 KV heads do not split over 4 devices"):
        serving_layout(mha, "tensor=4")
    assert isinstance(serving_layout(CFG, "tensor=4", slots=8), Layout)


def test_sample_command_on_a_mesh_prints_the_one_device_text(run, capsys):
    argv = ["sample", "--run", str(run), "--prompt", "hello", "--max-new-tokens", "12", "--temperature", "0"]
    assert cli.main(argv) == 0
    one_device = capsys.readouterr().out
    assert cli.main(argv + ["--mesh", "fsdp=2,tensor=2"]) == 0
    assert capsys.readouterr().out == one_device
    assert len(one_device) == len("hello") + 12 + 1 and one_device.startswith("hello")


def test_sample_and_serve_commands_refuse_a_mesh_that_does_not_fit_in_one_line(run, capsys):
    assert cli.main(["sample", "--run", str(run), "--prompt", "hello", "--mesh", "tensor=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "4 KV heads do not split over 8 devices" in err and "--mesh tensor=8" in err
    assert cli.main(["sample", "--run", str(run), "--prompt", "hello", "--mesh", "heads=2"]) == 2
    assert "'heads=2' must be AXIS=N" in capsys.readouterr().err
    assert cli.main(["serve", "--run", str(run), "--port", "0", "--slots", "3", "--mesh", "data=2,tensor=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--slots=3 does not divide over the 2 devices" in err


def test_serve_command_on_a_mesh_answers_as_one_device(run, reference):
    """`python -m infer serve --mesh data=2,tensor=2` (a real process on the 8 simulated devices its
    environment inherits) completes each prompt with the one-device greedy tokens."""
    import httpx

    from tests.infer.server_helpers import ServeProcess

    server = ServeProcess("--run", str(run), "--mesh", "data=2,tensor=2", "--slots", str(SLOTS))
    try:
        for prompt, n, expected in zip(PROMPTS, MAX_TOKENS, reference):
            r = httpx.post(server.base + "/v1/completions", timeout=120,
                           json={"model": "run", "prompt": prompt, "max_tokens": n, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == TOK.decode(expected)
        assert any("run: weights and KV cache split over data=2,tensor=2 (4 devices)" in line for line in server.lines)
    finally:
        server.kill()
