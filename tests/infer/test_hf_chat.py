"""import-hf keeps a Hugging Face model's chat template with its tokenizer: tokenizer_config.json's
`chat_template` (or chat_template.jinja) and bos/eos token strings travel in the checkpoint's
tokenizer JSON, and the loaded run renders conversations with it (needs only safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("safetensors")

from infer.hf import HFError, hf_config_from_model, import_hf, params_to_hf  # noqa: E402
from model.chat_template import chat_stop_token_ids, render_chat  # noqa: E402
from model.checkpoint import load_for_inference  # noqa: E402

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
            "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny Llama in Hugging Face layout, written from a jaxlm model, with a chat tokenizer."""
    from flax import nnx
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model import preset
    from model.transformer import build_model

    path = tmp_path_factory.mktemp("hf_chat")
    cfg = preset("llama-tiny", vocab_size=320, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                 max_seq_len=64)
    model = build_model(cfg, seed=0)
    save_file(params_to_hf(nnx.to_pure_dict(nnx.state(model)), cfg), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config_from_model(cfg)))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello there, how are you today? fine thanks"] * 20, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "eos_token": "<|im_end|>",
        "bos_token": {"content": "<s>", "lstrip": False, "rstrip": False, "special": True},  # AddedToken form
    }))
    return path


def test_import_keeps_the_chat_template_and_the_run_renders_with_it(hf_dir, tmp_path):
    import_hf(hf_dir, tmp_path / "run")
    tok = load_for_inference(tmp_path / "run").tokenizer
    assert tok.chat_template == TEMPLATE and tok.bos_token == "<s>" and tok.eos_token == "<|im_end|>"
    sp = tok.special_tokens
    assert tok.eos_id == sp["<|im_end|>"]
    ids = render_chat(tok, [{"role": "user", "content": " hi <|im_end|> "}])
    want = ([sp["<s>"], sp["<|im_start|>"]] + tok.encode("user\n").tolist() + tok.encode("hi <|im_end|>").tolist()
            + [sp["<|im_end|>"]] + tok.encode("\n").tolist() + [sp["<|im_start|>"]]
            + tok.encode("assistant\n").tolist())
    assert ids == want
    assert chat_stop_token_ids(tok) == [sp["<|im_end|>"]]


def test_chat_template_jinja_file_wins_and_a_list_picks_default(hf_dir, tmp_path):
    other = tmp_path / "hf"
    other.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (other / f).write_bytes((hf_dir / f).read_bytes())
    (other / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ 'D' }}"}]}))
    import_hf(other, tmp_path / "run1")
    assert load_for_inference(tmp_path / "run1").tokenizer.chat_template == "{{ 'D' }}"
    (other / "chat_template.jinja").write_text("{{ 'J' }}")
    import_hf(other, tmp_path / "run2")
    tok = load_for_inference(tmp_path / "run2").tokenizer
    assert tok.chat_template == "{{ 'J' }}" and tok.decode(render_chat(tok, [{"role": "user", "content": "x"}])) == "J"


def test_no_template_keeps_the_tokenizer_as_before_and_a_bad_one_is_an_hf_error(hf_dir, tmp_path):
    other = tmp_path / "hf"
    other.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (other / f).write_bytes((hf_dir / f).read_bytes())
    import_hf(other, tmp_path / "plain")
    tok = load_for_inference(tmp_path / "plain").tokenizer
    assert tok.chat_template is None and json.loads(tok.to_json()).keys() == {"kind", "tokenizer"}
    (other / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<nope>"}))
    import_hf(other, tmp_path / "eos_only")  # no template: the EOS is still named (and an unknown bos ignored)
    tok = load_for_inference(tmp_path / "eos_only").tokenizer
    assert tok.chat_template is None and tok.bos_token is None and tok.eos_id == tok.special_tokens["</s>"]
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(HFError, match="chat template does not compile"):
        import_hf(other, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
