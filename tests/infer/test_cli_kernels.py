"""Sampling a checkpoint trained with kernel settings (attention=pallas, matmul=pallas): the
sampler runs them with xla (the KV-cache path has only jnp attention, so `sample` offers no
`--attention`), and asking it for a kernel it cannot run is a one-line error. In-process
(`infer.cli.main`) to spare interpreter start-ups."""

from __future__ import annotations

import optax
import pytest

from infer.cli import main
from model import build_model, preset
from pallas_kernels import platform
from train.checkpoint import Checkpointer
from model.tokenizer import ByteTokenizer
from train.config import ConfigError, DataConfig, ExperimentConfig
from train.step import init_train_state


@pytest.fixture(scope="module")
def pallas_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pallas_run")
    tokenizer = ByteTokenizer()
    cfg = preset("gpt2-nano", vocab_size=tokenizer.vocab_size, n_layers=1, d_model=32, n_heads=2,
                 attention="pallas", matmul="pallas")
    _, state = init_train_state(build_model(cfg, seed=0), optax.adam(1e-3), seed=0)
    config = ExperimentConfig(model=cfg, data=DataConfig(seq_len=cfg.max_seq_len)).validate().to_dict()
    ckpt = Checkpointer(run / "checkpoints", async_save=False)
    ckpt.save(1, state, data_state={}, config=config, tokenizer_json=tokenizer.to_json())
    ckpt.close()
    return run


def test_checkpoint_trained_with_pallas_samples_with_xla(pallas_run, capsys):
    assert main(["sample", "--run", str(pallas_run), "--prompt", "ab", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")


def test_sampling_with_a_kernel_is_a_one_line_error(pallas_run, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:  # no kernel attention is offered for sampling at all
        main(["sample", "--run", str(pallas_run), "--prompt", "ab", "--attention", "pallas"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --attention pallas" in err[0]
    if platform.device_platform() == "cpu":
        monkeypatch.delenv(platform.ENV_VAR, raising=False)
        assert main(["sample", "--run", str(pallas_run), "--prompt", "ab", "--matmul", "pallas"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--matmul pallas needs a GPU or TPU" in err[0]


def test_training_with_pallas_on_cpu_is_a_config_error(tmp_path, monkeypatch):
    if platform.device_platform() != "cpu":
        pytest.skip("checks what a CPU cannot run")
    from train.config import load_config
    from train.loop import Trainer

    monkeypatch.delenv(platform.ENV_VAR, raising=False)
    cfg = load_config(None, ["model.preset=gpt2-nano", "model.attention=pallas", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="model.attention='pallas' needs a GPU or TPU"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()  # nothing was started
