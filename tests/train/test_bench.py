"""The benchmarks' PyTorch baseline is the same model as jaxlm's (same weights -> same logits, same
loss, same greedy tokens), and the benchmark harness times both frameworks."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from infer.sampler import Sampler  # noqa: E402
from model.config import preset  # noqa: E402
from model.transformer import build_model  # noqa: E402
from train import bench, torch_baseline  # noqa: E402
from train.config import OptimConfig  # noqa: E402
from train.step import cross_entropy  # noqa: E402

CFG = preset("gpt2-nano", vocab_size=37, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


@pytest.fixture(scope="module")
def models():
    model = build_model(CFG, seed=0)
    tmodel = torch_baseline.load_jaxlm_params(torch_baseline.TorchGPT(CFG), nnx.to_pure_dict(nnx.state(model)))
    return model, tmodel


def test_torch_baseline_with_jaxlm_weights_gives_the_same_logits_and_loss(models):
    model, tmodel = models
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, CFG.vocab_size, (3, 32)), rng.integers(0, CFG.vocab_size, (3, 32))
    logits, _ = model(jnp.asarray(tokens, jnp.int32))
    with torch.no_grad():
        tlogits = tmodel(torch.from_numpy(tokens))
    np.testing.assert_allclose(tlogits.numpy(), np.asarray(logits), atol=1e-5)  # float32, 2 layers
    total, count = cross_entropy(logits, jnp.asarray(targets, jnp.int32))
    tloss = torch.nn.functional.cross_entropy(tlogits.view(-1, CFG.vocab_size), torch.from_numpy(targets).view(-1))
    assert float(total / count) == pytest.approx(float(tloss), abs=1e-5)


def test_torch_kv_cache_decode_gives_jaxlm_sampler_tokens(models):
    model, tmodel = models
    prompts = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 5))
    expected = Sampler(model).generate(list(prompts), max_new_tokens=12, temperature=0.0)
    got = torch_baseline.generate_greedy(tmodel, torch.from_numpy(prompts), 12).tolist()
    assert got == expected


def test_bench_case_times_both_frameworks_each_in_its_own_process():
    import os

    case = bench.Case("tiny", CFG, OptimConfig(warmup_steps=2), batch=2, seq=16)
    res = bench.bench_case(case, steps=2, block=1, torch_threads=1)
    assert set(res) == {"jaxlm", "PyTorch"}
    for r in res.values():
        assert r["step"] > 0 and r["fwd"] > 0 and r["fwd_bwd"] > 0 and r["step_cpu"] > 0
    assert res["jaxlm"]["compile"] > 0
    assert res["jaxlm"]["pid"] == os.getpid() and res["PyTorch"]["pid"] != os.getpid()


def test_interleaved_alternates_blocks_and_collects_every_call():
    calls = []

    def runner(name):
        def run(m):
            calls.append((name, m))
            return [0.001] * m, [0.002] * m
        return run

    times, cpu = bench.interleaved({"a": runner("a"), "b": runner("b")}, n=5, block=2)
    assert calls == [("a", 2), ("b", 2), ("a", 2), ("b", 2), ("a", 1), ("b", 1)]
    assert all(len(t) == 5 for t in times.values()) and cpu["a"] == [0.002] * 5


def test_torch_train_step_lowers_the_loss():
    tmodel = torch_baseline.TorchGPT(dataclasses.replace(CFG))
    opt = torch_baseline.make_optimizer(tmodel, lr=1e-2)
    tokens = torch.from_numpy(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 16)))
    first = float(torch_baseline.train_step(tmodel, opt, tokens, tokens))
    for _ in range(5):
        last = float(torch_baseline.train_step(tmodel, opt, tokens, tokens))
    assert last < first


@pytest.mark.parametrize("module, args", [("train.bench", ["--models", "huge"]), ("train.bench", ["--steps", "0"]),
                                          ("infer.bench_torch", ["--models", "nope"]), ("infer.bench_torch", ["--batch", "0"])])
def test_bench_clis_reject_bad_arguments_with_exit_code_2(module, args, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(args)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_decode_bench_runs_torch_in_a_worker_and_both_produce_the_same_tokens(capsys):
    from infer import bench_torch

    assert bench_torch.main(["--rounds", "2", "--new-tokens", "6"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small")]
    assert [r.split("|")[4].strip() for r in rows] == ["jaxlm", "PyTorch"]
    jax_row = [c.strip() for c in rows[0].split("|")]
    assert jax_row[-2] == "100%"  # same greedy tokens from both frameworks
    assert float(jax_row[5]) > 0 and jax_row[9].endswith("x")  # generate ms, PyTorch/jaxlm ratio


def test_end_to_end_runs_both_commands_in_fresh_processes_and_prints_the_table(tmp_path, capsys, monkeypatch):
    """`--end-to-end` at a tiny size: both commands run to completion, each in its own process, and
    the table has both rows with wall time, peak RSS, val loss and the ratios."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the commands as a user runs them: one CPU device
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "self", "value", "(", ")", ":"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(words, size=8)) + "\n" for _ in range(200)))
    overrides = [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "model.attention=xla",
        "model.matmul=xla", "model.norm_impl=xla", "data.source=files", f"data.path={corpus}", "data.seq_len=32",
        "train.batch_size=4", "train.batch_splits=1", "train.steps=4", "train.log_every=2", "train.eval_every=2",
        "train.eval_batches=1", "train.sample_tokens=4", "train.sample_prompt=alpha", "checkpoint.every=2",
    ]
    work = tmp_path / "e2e"
    assert bench.main(["--end-to-end", "--repeats", "1", "--work-dir", str(work), *overrides]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| jaxlm") or line.startswith("| PyTorch")}
    assert set(rows) == {"jaxlm", "PyTorch"}
    for cells in rows.values():
        assert float(cells[0]) > 0 and float(cells[2]) > 50  # wall s, peak RSS MB (a Python process with its framework)
        assert 0 < float(cells[4]) < 10  # val loss over the whole split
    assert rows["jaxlm"][6].endswith("x**") and rows["jaxlm"][7].endswith("x**")  # both ratios
    assert (work / "torch_0" / "ckpt.pt").is_file() and (work / "torch_0" / "samples.txt").is_file()
    assert (work / "jaxlm_0" / "timeline.json").is_file()
    assert "jaxlm params_sha256: " in out and "machine: " in out and "torch " in out


def test_end_to_end_refuses_a_recipe_it_cannot_compare(capsys):
    assert bench.main(["--end-to-end", "--repeats", "1", "--recipe", str(bench.REPO / "experiments" / "quickstart.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "character-level recipes" in err[0]
