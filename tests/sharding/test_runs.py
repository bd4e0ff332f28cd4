"""Whole training runs across meshes and processes: `python -m train` on fsdp x tensor and a
2-process jax.distributed run log the single-device losses; a checkpoint saved on one mesh
restores onto others with identical values and training continues with the same losses; a bad
mesh is a one-line error before anything compiles."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from train.config import ConfigError, load_config
from train.data import prepare_data
from train.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5  # float32; sharded reductions only change the summation order
# The quickstart recipe shrunk to a tiny byte-level model and 3 steps; vocab 258 = the byte tokenizer's 257
# rounded up so that tensor=2 divides it.
TINY = [
    "model.n_layers=2", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=64",
    "model.max_seq_len=16", "model.vocab_size=258", "data.tokenizer=byte", "data.seq_len=16", "data.max_chars=20000",
    "train.batch_size=8", "train.steps=3", "train.log_every=1", "train.eval_every=0", "train.sample_tokens=0",
    "train.progress=false", "optim.warmup_steps=1", "checkpoint.every=0",
]


def logged_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], devices: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "train", "experiments/quickstart.yaml", *TINY, *args],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """The runs, concurrently (they share the 2 cores while each waits on its own start-up): with
    `python -m train`, fsdp=4 x tensor=2 on 8 devices and 2 processes x 2 devices with
    jax.distributed on a data=2 x fsdp=2 mesh; in this process, the 1-device reference. They read
    one token store, tokenized here, so no two processes write the same files. (Pipelined training
    equals the unpipelined model in test_parity.py, on stage=2 and stage=4.)"""
    tmp = tmp_path_factory.mktemp("cli")
    store = tmp / "shared"
    prepare_data(load_config(ROOT / "experiments/quickstart.yaml", TINY).data, store, progress=False)
    common = [f"data.store={store / 'tokens'}"]
    (tmp / "multi").mkdir()
    shutil.copy(store / "tokenizer.json", tmp / "multi" / "tokenizer.json")
    port = free_port()
    procs = {
        "fsdp_tp": launch([*common, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", f"run.dir={tmp / 'fsdp_tp'}"],
                          8, tmp / "fsdp_tp.log"),
    }
    for pid in range(2):
        procs[f"multi{pid}"] = launch([
            *common, "mesh.data=2", "mesh.fsdp=2", f"mesh.coordinator_address=127.0.0.1:{port}",
            "mesh.num_processes=2", f"mesh.process_id={pid}", f"run.dir={tmp / 'multi'}"], 2, tmp / f"multi{pid}.log")
    try:  # meanwhile, here: the single-device reference, on one of this process's 8 devices
        train(load_config(ROOT / "experiments/quickstart.yaml",
                          [*TINY, *common, "mesh.data=1", "mesh.num_devices=1", f"run.dir={tmp / 'single'}"]))
        codes = {name: p.wait(timeout=600) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    logs = {name: (tmp / f"{name}.log").read_text() for name in procs}
    return tmp, codes, logs


@pytest.mark.parametrize("run", ["fsdp_tp", "multi"])
def test_sharded_cli_runs_log_the_single_device_losses(cli_runs, run):
    tmp, codes, logs = cli_runs
    for name in {"multi": ("multi0", "multi1"), "fsdp_tp": ("fsdp_tp",)}.get(run, ()):
        assert codes[name] == 0, logs[name][-3000:]
    reference = logged_losses(tmp / "single")
    assert len(reference) == 3
    np.testing.assert_allclose(logged_losses(tmp / run), reference, rtol=RTOL)


def test_two_process_run_really_spans_two_processes(cli_runs):
    tmp, codes, logs = cli_runs
    assert codes["multi0"] == 0 and codes["multi1"] == 0, logs["multi0"][-3000:] + logs["multi1"][-3000:]
    for pid in range(2):
        assert f"process {pid} of 2, 2 local / 4 global devices" in logs[f"multi{pid}"], logs[f"multi{pid}"][-2000:]


def test_a_mesh_that_does_not_divide_the_model_is_one_line_exit_2(tmp_path, capsys):
    from train.__main__ import main

    assert main(["experiments/quickstart.yaml", *TINY, "mesh.data=1", "mesh.tensor=8", f"run.dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "heads" in errors[0] and "tensor=8" in errors[0] and "shape" in errors[0], errors


# ---- checkpoints onto other meshes (in this process: 8 simulated devices) --------------------

def corpus(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "return", "self", "(", ")", ":"]
    path = tmp / "corpus.txt"
    path.write_text("".join(" ".join(rng.choice(words, size=8)) + "\n" for _ in range(150)))
    return path


def remesh_config(tmp: Path, run: str, *mesh: str):
    return load_config(None, [
        "model.preset=llama-tiny", *TINY, "data.source=files", f"data.path={tmp / 'corpus.txt'}", "data.tokenizer=byte",
        "train.steps=6", "checkpoint.every=3", "checkpoint.async_save=false", f"run.dir={tmp / run}", *mesh])


def run_trainer(cfg, read_back_step=None):
    """(state as restored at start-up, parameter shardings, and after the run the state of
    checkpoint `read_back_step` restored onto this trainer's own mesh)."""
    trainer = Trainer(cfg)
    try:
        restored = jax.device_get((trainer.state.params, trainer.state.opt_state, trainer.state.step))
        shardings = jax.tree.map(lambda x: x.sharding, trainer.state.params)
        trainer.run()
        read_back = None
        if read_back_step is not None:
            read_back = jax.device_get(trainer.checkpointer.restore(read_back_step, trainer.state)[0])
    finally:
        trainer.close()
    return restored, shardings, read_back


def test_checkpoint_restores_onto_other_meshes_and_training_continues(tmp_path):
    corpus(tmp_path)
    original = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    # Checkpoints at steps 3 and 6; `saved`: checkpoint 3 restored onto the mesh it was saved from.
    _, _, saved = run_trainer(remesh_config(tmp_path, "original", *original), read_back_step=3)
    reference = logged_losses(tmp_path / "original")
    assert len(reference) == 6

    for name, mesh, n_devices in [("fsdp8", ["mesh.data=1", "mesh.fsdp=8"], 8),
                                  ("one_device", ["mesh.data=1", "mesh.num_devices=1"], 1)]:
        shutil.copytree(tmp_path / "original", tmp_path / name, ignore=shutil.ignore_patterns("6"))
        (tmp_path / name / "metrics.jsonl").write_text("")
        (restored_params, restored_opt, step), shardings, _ = run_trainer(remesh_config(tmp_path, name, *mesh))
        assert int(step) == 3
        jax.tree.map(np.testing.assert_array_equal, restored_params, saved.params)
        jax.tree.map(np.testing.assert_array_equal, restored_opt, saved.opt_state)
        for s in jax.tree.leaves(shardings):
            assert len(s.device_set) == n_devices
        np.testing.assert_allclose(logged_losses(tmp_path / name), reference[3:], rtol=RTOL, err_msg=name)


def test_bad_mesh_in_a_trainer_is_a_config_error_before_compiling(tmp_path):
    corpus(tmp_path)
    with pytest.raises(ConfigError, match="has 4 positions but there are 8 devices"):
        Trainer(remesh_config(tmp_path, "bad1", "mesh.data=1", "mesh.fsdp=4"))
    with pytest.raises(ConfigError, match=r"each \(micro\)batch .*batch=4.*data=1 x fsdp=8"):
        Trainer(remesh_config(tmp_path, "bad2", "mesh.data=1", "mesh.fsdp=8", "train.batch_size=4"))
