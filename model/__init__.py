"""Flax NNX decoder-only transformers (GPT-2 and Llama families)."""

from model.config import PRESETS, ModelConfig, preset
from model.transformer import KVCache, Transformer, build_model, state_shardings

__all__ = ["PRESETS", "ModelConfig", "preset", "KVCache", "Transformer", "build_model", "state_shardings"]
