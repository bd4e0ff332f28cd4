"""`ModelConfig`: every architectural choice of a jaxlm transformer, and named presets.

A preset is a complete `ModelConfig`; an experiment picks one with `model.preset=NAME` and
overrides single fields (`model.n_layers=2`). The config is stored with every run and
checkpoint, so a checkpoint alone rebuilds its model.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A user mistake in a config file, an override, a saved config or a combination of values."""


NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("xla", "pallas", "cudnn", "cpu")  # values of model.attention; model/attention.py dispatches them
MATMUL_IMPLS = ("xla", "pallas", "cpu")  # the dense layers' matmul, see model/layers.py: dense
NORM_IMPLS = ("xla", "cpu")  # LayerNorm / RMSNorm: jnp, or pallas_kernels.cpu's C++ kernel


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer. Shape letters: V vocab, D d_model, F d_ff."""

    vocab_size: int = 0  # 0: taken from the tokenizer at run time
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head attention); fewer: grouped-query attention
    d_ff: int = 0  # 0: 4 * d_model for gelu, the Llama rule (2/3 * 4 * d_model, rounded to 256) for swiglu
    max_seq_len: int = 256
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    positions: str = "learned"
    rope_theta: float = 10000.0
    mlp: str = "gelu"
    bias: bool = True  # biases in attention / MLP projections and in LayerNorm
    tie_embeddings: bool = True
    dropout: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "xla"
    matmul: str = "xla"  # attention projections and MLP: xla (jnp), pallas (pallas_kernels.matmul), cpu (C++ dW)
    norm_impl: str = "xla"  # the norms: xla (jnp) or cpu (pallas_kernels.cpu's C++ kernel)
    init_std: float = 0.02
    scan_layers: bool = True  # lax.scan over layers (compile time independent of depth) or unroll
    gelu_approximate: bool = False  # tanh GELU (Hugging Face GPT-2's "gelu_new") instead of the exact erf one

    # ---- derived -------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            hidden = int(2 * 4 * self.d_model / 3)
            return 256 * ((hidden + 255) // 256)
        return 4 * self.d_model

    def validate(self) -> "ModelConfig":
        """Raise ConfigError naming the field and what is allowed; return self when valid."""
        choice("model.norm", self.norm, NORMS)
        choice("model.positions", self.positions, POSITIONS)
        choice("model.mlp", self.mlp, MLPS)
        choice("model.param_dtype", self.param_dtype, DTYPES)
        choice("model.compute_dtype", self.compute_dtype, DTYPES)
        choice("model.attention", self.attention, ATTENTION_IMPLS)
        choice("model.matmul", self.matmul, MATMUL_IMPLS)
        choice("model.norm_impl", self.norm_impl, NORM_IMPLS)
        if self.attention != "xla" and self.dropout > 0:
            raise ConfigError(f"model.attention={self.attention!r} has no attention dropout; set model.dropout=0 "
                             "or use model.attention='xla'")
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a positive integer")
        for name in ("vocab_size", "n_kv_heads", "d_ff"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 0 (0 means automatic)")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.kv_heads}"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(f"rope needs an even head dim, got d_model/n_heads={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta} must be positive")
        return self

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count, computed from the config (matches the built model)."""
        D, F, V, L = self.d_model, self.ff_dim, self.vocab_size, self.n_layers
        Dh, H, K = self.head_dim, self.n_heads, self.kv_heads
        norm = D * (2 if (self.norm == "layernorm" and self.bias) else 1)
        attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D
        if self.bias:
            attn += H * Dh + 2 * K * Dh + D
        if self.mlp == "swiglu":
            mlp = 3 * D * F + (2 * F + D if self.bias else 0)
        else:
            mlp = 2 * D * F + (F + D if self.bias else 0)
        total = L * (2 * norm + attn + mlp) + norm
        emb = V * D + (0 if self.tie_embeddings else V * D)
        if self.positions == "learned":
            emb += self.max_seq_len * D
        return total + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B convention:
        6 * N (non-embedding matmul params plus the output projection) + 12 * L * D * T for attention."""
        n = self.num_params(include_embedding=False) + self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * seq_len


def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """Raise ConfigError unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


_GPT2 = dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True)
_LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, tie_embeddings=False)

PRESETS: dict[str, ModelConfig] = {
    # nanoGPT's "baby GPT" (config/train_shakespeare_char.py with the CPU overrides of its README).
    # Small presets unroll their layers: on CPU that is faster than a scan, and they compile fast anyway.
    "gpt2-nano": ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=64, scan_layers=False, **_GPT2),
    "gpt2-124m": ModelConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, **_GPT2),
    "llama-tiny": ModelConfig(
        d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256, norm_eps=1e-5,
        scan_layers=False, **_LLAMA
    ),
    "llama-1b": ModelConfig(  # Llama 3.2 1B
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
        max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5, **{**_LLAMA, "tie_embeddings": True},
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
        max_seq_len=8192, rope_theta=500000.0, norm_eps=1e-5, **_LLAMA,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset with field overrides, validated."""
    return dataclasses.replace(_preset_base(name), **overrides).validate()


def model_config_from_dict(body: dict[str, Any]) -> ModelConfig:
    """The model section of a config (YAML, overrides or a checkpoint's saved config): `preset`
    picks the starting point, every other key overrides one field, checked and coerced."""
    body = dict(body)
    base = _preset_base(body.pop("preset")) if "preset" in body else ModelConfig()
    return build_section("model", base, body, extra_allowed=" (or preset)")


def _preset_base(name: Any) -> ModelConfig:
    """The one preset lookup: a ConfigError naming the allowed presets for an unknown name."""
    choice("model.preset", str(name), tuple(PRESETS))
    return PRESETS[str(name)]


def build_section(name: str, base: Any, body: dict[str, Any], extra_allowed: str = "") -> Any:
    """`base` (a frozen config dataclass) with the fields in `body` replaced, each coerced to the
    field's type; an unknown key or a value of the wrong type is a ConfigError naming `name.key`."""
    hints = typing.get_type_hints(type(base))
    fields = {f.name for f in dataclasses.fields(base)}
    values = {}
    for key, value in body.items():
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}; allowed: {', '.join(sorted(fields))}{extra_allowed}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return dataclasses.replace(base, **values)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} must be a number")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    raise ConfigError(f"{key}: unsupported config type {typ}")
