"""Hugging Face interop against transformers itself, on tiny random-weight models (no download):
imported GPT-2 / Llama logits equal transformers' in float32, an exported jaxlm checkpoint loads in
transformers with the same logits, and import after export is lossless."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from infer.hf import HFError, export_hf, import_hf, model_config_from_hf  # noqa: E402
from model.checkpoint import load_for_inference  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
V = 300
TOKENS = np.array([[5, 17, 250, 3, 99, 42, 7, 7, 120, 299, 0, 64]], np.int64)


def tokenizer_json(path: Path) -> None:
    from model.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 20], vocab_size=280, progress=False)
    tok._tok.save(str(path / "tokenizer.json"))


def make_hf(kind: str, path: Path):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=500000.0, tie_word_embeddings=(kind == "llama_tied"),
                                       rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # bigger weights than the default init, so logits are far from uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer_json(path)
    return model


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.float().numpy()


def jax_logits(model, tokens) -> np.ndarray:
    return np.asarray(model(np.asarray(tokens, np.int32))[0])


@pytest.fixture(scope="module", params=["gpt2", "llama_untied", "llama_tied"])
def imported(request, tmp_path_factory):
    base = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, base / "hf")
    import_hf(base / "hf", base / "run")
    return request.param, hf, base


def test_imported_logits_equal_transformers(imported):
    kind, hf, base = imported
    _, model, tokenizer, step = load_for_inference(base / "run")
    cfg = model.cfg
    assert step == 0 and tokenizer.kind == "bpe"
    if kind != "gpt2":
        assert cfg.kv_heads == 2 and cfg.rope_theta == 500000.0
        assert cfg.tie_embeddings == (kind == "llama_tied")
    np.testing.assert_allclose(jax_logits(model, TOKENS), hf_logits(hf, TOKENS), atol=1e-4, rtol=0)


def test_export_loads_in_transformers_and_reimport_is_lossless(imported):
    kind, hf, base = imported
    export_hf(base / "run", base / "exported")
    again = transformers.AutoModelForCausalLM.from_pretrained(base / "exported", torch_dtype=torch.float32).eval()
    _, model, _, _ = load_for_inference(base / "run")
    np.testing.assert_allclose(hf_logits(again, TOKENS), jax_logits(model, TOKENS), atol=1e-4, rtol=0)
    import_hf(base / "exported", base / "reimported")
    from flax import nnx
    import jax

    a = nnx.to_pure_dict(nnx.state(model))
    b = nnx.to_pure_dict(nnx.state(load_for_inference(base / "reimported")[1]))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_jaxlm_trained_layout_exports(tmp_path):
    """A model made by jaxlm (not imported) with exact GELU exports with activation "gelu"."""
    from infer.hf import hf_config_from_model
    from model import preset

    hf_cfg = hf_config_from_model(preset("gpt2-nano", vocab_size=65))
    assert hf_cfg["activation_function"] == "gelu"
    with pytest.raises(HFError, match="no Hugging Face equivalent"):
        hf_config_from_model(preset("gpt2-nano", vocab_size=65, bias=False))


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_options_are_one_error(change, match):
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, **change}
    with pytest.raises(HFError, match=match):
        model_config_from_hf(cfg)


def test_cli_import_errors_are_one_line(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "infer", "import-hf", str(tmp_path / "hf"), str(tmp_path / "run")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2
    assert "BertModel" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
