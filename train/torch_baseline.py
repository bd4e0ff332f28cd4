"""The PyTorch baseline of train.bench and infer.bench_torch: jaxlm's GPT-2 family model (LayerNorm with
bias, learned positions, exact GELU MLP, tied embeddings, no dropout) and its AdamW, written the
way nanoGPT writes them (eager PyTorch, `F.scaled_dot_product_attention`), so the benchmarks can
time the same model and optimizer side by side. Only imported when torch is installed.

Shape letters: B batch, L sequence, D embed, H heads, Dh head dim, V vocab, S cache slots.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # annotations only: train.torch_e2e runs this model without importing jax (model/ does)
    from model.config import ModelConfig


def check_supported(cfg: ModelConfig) -> None:
    """The baseline covers the GPT-2 family only; say so instead of timing a different model."""
    if (cfg.norm, cfg.positions, cfg.mlp, cfg.bias, cfg.tie_embeddings) != ("layernorm", "learned", "gelu", True, True) \
            or cfg.kv_heads != cfg.n_heads:
        raise ValueError("the PyTorch baseline implements the GPT-2 family only (layernorm, learned positions, "
                         "gelu, bias, tied embeddings, no grouped-query attention)")


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.d_model
        self.n_heads = cfg.n_heads
        self.ln_1 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)
        self.ln_2 = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(D, cfg.ff_dim)
        self.mlp_proj = nn.Linear(cfg.ff_dim, D)

    def forward(self, x, cache=None, index=0):
        """x: (B, L, D). With `cache=(k, v)` of shape (B, H, S, Dh), writes this segment's keys and
        values at slot `index` and attends to slots [0, index + L)."""
        B, L, D = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(D, dim=2)
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            ck, cv = cache
            ck[:, :, index:index + L] = k
            cv[:, :, index:index + L] = v
            k, v = ck[:, :, :index + L], cv[:, :, :index + L]
            # A single new token attends to every filled slot; a prompt (index 0) is causal.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        y = y.transpose(1, 2).contiguous().view(B, L, D)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class TorchGPT(nn.Module):
    """nanoGPT's GPT with jaxlm's config (and jaxlm's initialization: normal(0, init_std), output
    projections scaled by 1/sqrt(2 n_layers), zero biases)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_supported(cfg)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if "proj" in name else cfg.init_std
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens, cache=None, index=0):
        """tokens: (B, L) int64 -> logits (B, L, V). `cache`: a list of per-layer (k, v)."""
        L = tokens.shape[1]
        pos = torch.arange(index, index + L, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i], index)
        return self.ln_f(x) @ self.wte.weight.t()  # tied head, (B, L, V)

    def init_cache(self, batch: int, length: int):
        cfg = self.cfg
        shape = (batch, cfg.n_heads, length, cfg.head_dim)
        return [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.n_layers)]


@torch.no_grad()
def load_jaxlm_params(model: TorchGPT, params) -> TorchGPT:
    """Copy a jaxlm GPT-2 family model's parameters (`nnx.to_pure_dict(nnx.state(model))`) into
    `model`, so both frameworks compute with the same weights."""
    import numpy as np

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    D = model.cfg.d_model
    model.wte.weight.copy_(t(params["embed"]))
    model.wpe.weight.copy_(t(params["pos_embed"]))
    model.ln_f.weight.copy_(t(params["final_norm"]["scale"]))
    model.ln_f.bias.copy_(t(params["final_norm"]["bias"]))
    b = params["blocks"]  # every leaf has a leading layers axis
    for i, blk in enumerate(model.blocks):
        a, m = b["attn"], b["mlp"]
        blk.ln_1.weight.copy_(t(b["attn_norm"]["scale"][i]))
        blk.ln_1.bias.copy_(t(b["attn_norm"]["bias"][i]))
        blk.ln_2.weight.copy_(t(b["mlp_norm"]["scale"][i]))
        blk.ln_2.bias.copy_(t(b["mlp_norm"]["bias"][i]))
        qkv = [np.asarray(a[n][i]).reshape(D, D) for n in ("wq", "wk", "wv")]  # (D, H*Dh) each
        blk.c_attn.weight.copy_(t(np.concatenate(qkv, axis=1).T))  # torch Linear stores (out, in)
        blk.c_attn.bias.copy_(t(np.concatenate([np.asarray(a[n][i]).reshape(D) for n in ("bq", "bk", "bv")])))
        blk.c_proj.weight.copy_(t(np.asarray(a["wo"][i]).reshape(D, D).T))
        blk.c_proj.bias.copy_(t(a["bo"][i]))
        blk.c_fc.weight.copy_(t(np.asarray(m["w_up"][i]).T))
        blk.c_fc.bias.copy_(t(m["b_up"][i]))
        blk.mlp_proj.weight.copy_(t(np.asarray(m["w_down"][i]).T))
        blk.mlp_proj.bias.copy_(t(m["b_down"][i]))
    return model


def make_optimizer(model: TorchGPT, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.1, eps: float = 1e-8):
    """nanoGPT's configure_optimizers: decay the matrices (>= 2 dims) except embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "wte" not in name and "wpe" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def train_step(model: TorchGPT, opt, inputs, targets, clip_norm: float = 1.0) -> float:
    """One nanoGPT step: forward, mean cross-entropy, backward, clip, AdamW."""
    logits = model(inputs)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return loss.detach()


@torch.no_grad()
def generate_greedy(model: TorchGPT, prompt, max_new_tokens: int):
    """Prefill then one token at a time with a KV cache (greedy). prompt: (B, Lp) int64."""
    B, Lp = prompt.shape
    cache = model.init_cache(B, Lp + max_new_tokens)
    logits = model(prompt, cache, 0)
    token = logits[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for i in range(max_new_tokens - 1):
        token = model(token, cache, Lp + i)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)
