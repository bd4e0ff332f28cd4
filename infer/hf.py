"""Hugging Face interop: GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`) weights in and out.

    python -m infer import-hf HF_DIR RUN_DIR   # config.json + *.safetensors + tokenizer.json -> a run directory
    python -m infer export-hf RUN_DIR HF_DIR   # a run's checkpoint -> a directory transformers loads

A run directory made by import-hf holds what training would leave for inference: `config.yaml` and
`checkpoints/0/` (params, resolved config, tokenizer), so `python -m infer sample` accepts it. The
tokenizer keeps the model's chat template (tokenizer_config.json or chat_template.jinja) for chat.
Reading and writing needs only `safetensors` (and jax); `transformers` and `torch` (the `hf` extra)
are needed only to load the exported directory in transformers.

Layout differences handled here (jaxlm shapes have a leading `layers` axis L):
  GPT-2 Conv1D weights are stored (in, out) and q/k/v are fused in `c_attn` (D, 3D);
  Llama Linear weights are stored (out, in); both keep heads flattened (H*Dh) where jaxlm splits them.
Anything this mapping cannot represent exactly (other architectures, rope scaling, biases on Llama,
cross attention, ...) is a `HFError` naming the option.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from model.config import ModelConfig


class HFError(ValueError):
    """A Hugging Face directory or a jaxlm model that this mapping cannot convert (one line)."""


# ---- config ------------------------------------------------------------------------------------

def model_config_from_hf(hf: dict) -> ModelConfig:
    """jaxlm ModelConfig from a Hugging Face config.json dict (float32 parameters and compute)."""
    arch = (hf.get("architectures") or [hf.get("model_type", "?")])[0]
    if arch == "GPT2LMHeadModel" or (arch == "gpt2"):
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise HFError(f"GPT-2 activation_function={act!r} is not supported (gelu_new, gelu_pytorch_tanh, gelu)")
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if hf.get(key):
                raise HFError(f"GPT-2 option {key}=true is not supported")
        if hf.get("scale_attn_weights", True) is not True:
            raise HFError("GPT-2 option scale_attn_weights=false is not supported")
        if hf.get("tie_word_embeddings", True) is not True:
            raise HFError("GPT-2 with tie_word_embeddings=false is not supported")
        D = hf["n_embd"]
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["n_layer"], n_heads=hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * D, max_seq_len=hf["n_positions"], norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned", mlp="gelu", bias=True,
            tie_embeddings=True, gelu_approximate=act != "gelu", scan_layers=False,
        ).validate()
    if arch == "LlamaForCausalLM" or arch == "llama":
        if hf.get("rope_scaling"):
            raise HFError(f"Llama rope_scaling={hf['rope_scaling']!r} is not supported (only plain RoPE)")
        rope = hf.get("rope_parameters") or {}  # transformers >= 5 keeps rope_theta in here
        if rope.get("rope_type", "default") != "default":
            raise HFError(f"Llama rope_parameters rope_type={rope['rope_type']!r} is not supported (only default)")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise HFError("Llama with attention_bias or mlp_bias is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise HFError(f"Llama hidden_act={hf['hidden_act']!r} is not supported (silu)")
        D, H = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, D // H):
            raise HFError(f"Llama head_dim={hf['head_dim']} must be hidden_size / num_attention_heads = {D // H}")
        return ModelConfig(
            vocab_size=hf["vocab_size"], d_model=D, n_layers=hf["num_hidden_layers"], n_heads=H,
            n_kv_heads=hf.get("num_key_value_heads") or H, d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
            positions="rope", rope_theta=float(theta), mlp="swiglu", bias=False,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), scan_layers=False,
        ).validate()
    raise HFError(f"architecture {arch!r} is not supported; import-hf reads GPT2LMHeadModel and LlamaForCausalLM")


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' when `cfg` is exactly one of the two Hugging Face layouts, else HFError."""
    if cfg.norm == "layernorm" and cfg.positions == "learned" and cfg.mlp == "gelu" and cfg.bias \
            and cfg.tie_embeddings and cfg.kv_heads == cfg.n_heads:
        return "gpt2"
    if cfg.norm == "rmsnorm" and cfg.positions == "rope" and cfg.mlp == "swiglu" and not cfg.bias:
        return "llama"
    raise HFError(
        "this model has no Hugging Face equivalent: export-hf writes GPT-2 (layernorm, learned positions, gelu, "
        "bias, tied embeddings, no grouped-query heads) or Llama (rmsnorm, rope, swiglu, no bias) models; got "
        f"norm={cfg.norm}, positions={cfg.positions}, mlp={cfg.mlp}, bias={cfg.bias}, "
        f"tie_embeddings={cfg.tie_embeddings}, n_kv_heads={cfg.kv_heads}")


def hf_config_from_model(cfg: ModelConfig) -> dict:
    """config.json for transformers from a jaxlm ModelConfig."""
    if family(cfg) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.ff_dim, "activation_function": "gelu_new" if cfg.gelu_approximate else "gelu",
            "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "tie_word_embeddings": True, "torch_dtype": "float32",
        }
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"}, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
    }


# ---- weights -----------------------------------------------------------------------------------

def params_from_hf(w: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """jaxlm parameters (nnx pure dict, float32 numpy) from Hugging Face tensors."""
    L, D, H, K, Dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    w = {k.removeprefix("transformer.") if k.startswith("transformer.") else k: v for k, v in w.items()}

    def get(name):
        if name not in w:
            raise HFError(f"the safetensors weights have no tensor {name!r}")
        return np.asarray(w[name], np.float32)

    def stack(fmt, fn=lambda x: x):
        return np.stack([fn(get(fmt.format(i))) for i in range(L)])

    if family(cfg) == "gpt2":
        def qkv(i, j):  # c_attn (D, 3D) -> part j as (D, H, Dh)
            return get(f"h.{i}.attn.c_attn.weight")[:, j * D:(j + 1) * D].reshape(D, H, Dh)

        def qkv_b(i, j):
            return get(f"h.{i}.attn.c_attn.bias")[j * D:(j + 1) * D].reshape(H, Dh)

        blocks = {
            "attn_norm": {"scale": stack("h.{}.ln_1.weight"), "bias": stack("h.{}.ln_1.bias")},
            "mlp_norm": {"scale": stack("h.{}.ln_2.weight"), "bias": stack("h.{}.ln_2.bias")},
            "attn": {
                "wq": np.stack([qkv(i, 0) for i in range(L)]), "wk": np.stack([qkv(i, 1) for i in range(L)]),
                "wv": np.stack([qkv(i, 2) for i in range(L)]),
                "bq": np.stack([qkv_b(i, 0) for i in range(L)]), "bk": np.stack([qkv_b(i, 1) for i in range(L)]),
                "bv": np.stack([qkv_b(i, 2) for i in range(L)]),
                "wo": stack("h.{}.attn.c_proj.weight", lambda x: x.reshape(H, Dh, D)),
                "bo": stack("h.{}.attn.c_proj.bias"),
            },
            "mlp": {"w_up": stack("h.{}.mlp.c_fc.weight"), "b_up": stack("h.{}.mlp.c_fc.bias"),
                    "w_down": stack("h.{}.mlp.c_proj.weight"), "b_down": stack("h.{}.mlp.c_proj.bias")},
        }
        return {"embed": get("wte.weight"), "pos_embed": get("wpe.weight"), "blocks": blocks,
                "final_norm": {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")}}

    p = "model.layers.{}."
    blocks = {
        "attn_norm": {"scale": stack(p + "input_layernorm.weight")},
        "mlp_norm": {"scale": stack(p + "post_attention_layernorm.weight")},
        "attn": {
            "wq": stack(p + "self_attn.q_proj.weight", lambda x: x.T.reshape(D, H, Dh)),
            "wk": stack(p + "self_attn.k_proj.weight", lambda x: x.T.reshape(D, K, Dh)),
            "wv": stack(p + "self_attn.v_proj.weight", lambda x: x.T.reshape(D, K, Dh)),
            "wo": stack(p + "self_attn.o_proj.weight", lambda x: x.T.reshape(H, Dh, D)),
        },
        "mlp": {"w_gate": stack(p + "mlp.gate_proj.weight", np.transpose),
                "w_up": stack(p + "mlp.up_proj.weight", np.transpose),
                "w_down": stack(p + "mlp.down_proj.weight", np.transpose)},
    }
    out = {"embed": get("model.embed_tokens.weight"), "blocks": blocks,
           "final_norm": {"scale": get("model.norm.weight")}}
    if not cfg.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    return out


def params_to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Hugging Face tensors (contiguous float32 numpy) from jaxlm parameters (nnx pure dict)."""
    L, D, H, K, Dh = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    p = jax_tree_to_numpy(params)
    b, out = p["blocks"], {}
    if family(cfg) == "gpt2":
        out["transformer.wte.weight"] = p["embed"]
        out["transformer.wpe.weight"] = p["pos_embed"]
        for i in range(L):
            h = f"transformer.h.{i}."
            a = b["attn"]
            out[h + "ln_1.weight"], out[h + "ln_1.bias"] = b["attn_norm"]["scale"][i], b["attn_norm"]["bias"][i]
            out[h + "ln_2.weight"], out[h + "ln_2.bias"] = b["mlp_norm"]["scale"][i], b["mlp_norm"]["bias"][i]
            out[h + "attn.c_attn.weight"] = np.concatenate([a[n][i].reshape(D, D) for n in ("wq", "wk", "wv")], 1)
            out[h + "attn.c_attn.bias"] = np.concatenate([a[n][i].reshape(D) for n in ("bq", "bk", "bv")])
            out[h + "attn.c_proj.weight"], out[h + "attn.c_proj.bias"] = a["wo"][i].reshape(D, D), a["bo"][i]
            m = b["mlp"]
            out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = m["w_up"][i], m["b_up"][i]
            out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = m["w_down"][i], m["b_down"][i]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = p["final_norm"]["scale"], p["final_norm"]["bias"]
    else:
        out["model.embed_tokens.weight"] = p["embed"]
        for i in range(L):
            h = f"model.layers.{i}."
            a, m = b["attn"], b["mlp"]
            out[h + "input_layernorm.weight"] = b["attn_norm"]["scale"][i]
            out[h + "post_attention_layernorm.weight"] = b["mlp_norm"]["scale"][i]
            out[h + "self_attn.q_proj.weight"] = a["wq"][i].reshape(D, H * Dh).T
            out[h + "self_attn.k_proj.weight"] = a["wk"][i].reshape(D, K * Dh).T
            out[h + "self_attn.v_proj.weight"] = a["wv"][i].reshape(D, K * Dh).T
            out[h + "self_attn.o_proj.weight"] = a["wo"][i].reshape(H * Dh, D).T
            out[h + "mlp.gate_proj.weight"] = m["w_gate"][i].T
            out[h + "mlp.up_proj.weight"] = m["w_up"][i].T
            out[h + "mlp.down_proj.weight"] = m["w_down"][i].T
        out["model.norm.weight"] = p["final_norm"]["scale"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = p["lm_head"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def jax_tree_to_numpy(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def read_safetensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a (possibly sharded) safetensors checkpoint, as float32 numpy (bf16 included)."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise HFError(f"{hf_dir}: no *.safetensors file (PyTorch .bin checkpoints are not read)")
    out = {}
    for f in files:
        with safe_open(str(f), framework="flax") as fh:  # the flax framework reads bfloat16, numpy does not
            for k in fh.keys():
                out[k] = np.asarray(fh.get_tensor(k).astype("float32"))
    return out


# ---- directories -------------------------------------------------------------------------------

def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Convert a Hugging Face model directory into a jaxlm run directory (checkpoint step 0)."""
    import jax
    import yaml
    from flax import nnx

    from model.checkpoint import save_model
    from model.tokenizer import BPETokenizer
    from model.transformer import abstract_model

    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not (hf_dir / "config.json").is_file():
        raise HFError(f"{hf_dir}: no config.json (a Hugging Face model directory is expected)")
    if not (hf_dir / "tokenizer.json").is_file():
        raise HFError(f"{hf_dir}: no tokenizer.json (the run needs the tokenizer; save it with tokenizer.save_pretrained)")
    if (run_dir / "checkpoints").exists():
        raise HFError(f"{run_dir} already holds checkpoints; choose a new run directory")
    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    try:
        tokenizer = with_hf_chat_template(BPETokenizer.load(hf_dir / "tokenizer.json"), hf_dir)
    except ValueError as e:
        raise HFError(str(e)) from None
    if tokenizer.vocab_size > cfg.vocab_size:
        raise HFError(f"tokenizer.json has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    params = params_from_hf(read_safetensors(hf_dir), cfg)

    # Check every tensor against the shapes jaxlm builds for this config before writing anything.
    want = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(abstract_model(cfg)[1]))
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    if want != got:
        raise HFError(f"{hf_dir}: tensor shapes do not match config.json (expected {want}, got {got})")
    # The experiment sections an imported model has; the trainer fills in the defaults of the rest.
    config = {"model": dataclasses.asdict(cfg), "data": {"tokenizer": "bpe", "seq_len": cfg.max_seq_len},
              "run": {"name": run_dir.name, "dir": str(run_dir)}}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save_model(run_dir / "checkpoints", 0, jax.tree.map(np.asarray, params), config, tokenizer.to_json())
    return run_dir


def with_hf_chat_template(tokenizer, hf_dir: str | Path):
    """`tokenizer` carrying the directory's chat template (`chat_template.jinja`, else
    tokenizer_config.json's `chat_template`, the "default" one of a list) and its bos/eos token
    strings, so the server renders imported models' conversations as transformers does. Without a
    template only the bos/eos names are kept (jaxlm's own template applies to chat)."""
    from model.chat_template import ChatTemplate

    hf_dir = Path(hf_dir)
    config_path = hf_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise HFError(f"{config_path} is not valid JSON: {e}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if (hf_dir / "chat_template.jinja").is_file():  # what newer transformers write
        template = (hf_dir / "chat_template.jinja").read_text()
    template = template if isinstance(template, str) else None

    def token(key):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    bos, eos = token("bos_token"), token("eos_token")
    if template is None:  # no chat: still name the EOS (generation stops there), if it is a control token
        bos, eos = (t if t in tokenizer.special_tokens else None for t in (bos, eos))
        if bos is None and eos is None:
            return tokenizer
    else:
        # A bos/eos string the template writes must parse as its token: register it (an id it
        # already has in the vocabulary is kept; a new one is caught by the vocabulary-size check).
        tokenizer = tokenizer.with_special_tokens([t for t in (bos, eos) if t is not None])
    tokenizer = tokenizer.with_chat_template(template, bos_token=bos, eos_token=eos)
    if template is not None:
        try:
            ChatTemplate(tokenizer)  # compiles the template: a syntax error is caught at import
        except ValueError as e:
            raise HFError(f"{hf_dir}: {e}") from None
    return tokenizer


def export_hf(run, hf_dir: str | Path, step: int | None = None) -> Path:
    """Write a run's checkpoint (a run directory, or a `LoadedModel` already loaded) as a Hugging Face
    directory: config.json, model.safetensors and, for a BPE tokenizer, tokenizer.json (char and byte
    tokenizers have no transformers equivalent)."""
    from flax import nnx
    from safetensors.numpy import save_file

    from model.checkpoint import LoadedModel, load_for_inference

    _, model, tokenizer, _ = run if isinstance(run, LoadedModel) else load_for_inference(run, step)
    cfg = model.cfg
    family(cfg)  # fail before writing anything
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(nnx.to_pure_dict(nnx.state(model)), cfg)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    (hf_dir / "config.json").write_text(json.dumps(hf_config_from_model(cfg), indent=2))
    if tokenizer.kind == "bpe":
        (hf_dir / "tokenizer.json").write_text(json.dumps(json.loads(tokenizer.to_json())["tokenizer"]))
    return hf_dir
