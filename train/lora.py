"""LoRA fine-tuning (finetune.lora_rank > 0): only the adapters train, only the adapters are saved.

The run starts from its base (finetune.init_from, loaded as for any fine-tuning run), attaches
rank-r adapters to the targeted projections (model/lora.py) and splits the parameters in two:

  TrainState.params  the adapters alone: the gradient, the optimizer state, the numerical guard's
                     select and the checkpoint's `params` item cover only them;
  TrainState.frozen  the base: an input of every step that no step writes, so it stays bitwise
                     what was loaded (the base's own checkpoint is only ever read).

A LoRA run's checkpoint is small: `params` = the adapters, `config` = the resolved config
(finetune.init_from names the base, finetune.lora_* the adapters), `lora` = where the base was
found (absolute run directory and step, so a base trained further later is still the one these
adapters were trained on), the tokenizer, and training's items (optimizer state of the adapters,
data-iterator state). `model.checkpoint.load_for_inference` loads the base, folds the adapters
into its weights (W + alpha / r * A B) and returns a plain model: `python -m infer` (sample, chat,
serve) and both exports take that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model import lora
from model.config import ConfigError
from train.step import TrainState, with_frozen


def enabled(finetune) -> bool:
    """Whether the run's `finetune` section asks for LoRA."""
    return finetune.lora_rank > 0


def checkpoint_meta(finetune_cfg, source) -> dict | None:
    """The checkpoint items a LoRA run adds ({'lora': ...}; None for other runs): its base as an
    absolute run directory and the step `finetune.init_from` resolved to (`source`,
    train/finetune.py), and the adapters' settings."""
    if not enabled(finetune_cfg):
        return None
    return {"lora": {"base": str(Path(source.path).absolute()), "base_step": int(source.step),
                     "rank": finetune_cfg.lora_rank, "alpha": finetune_cfg.lora_alpha,
                     "targets": finetune_cfg.lora_targets}}


def lora_train_state(model: nnx.Module, tx: optax.GradientTransformation, finetune_cfg, seed: int, source
                     ) -> tuple[Any, TrainState]:
    """Load the base (`source`, train/finetune.py) into `model`, attach the adapters and split it
    into (graphdef, TrainState) with the adapters as `params` and the base as `frozen`. Called on
    resume too: the base is never in the run's own checkpoints."""
    from train import finetune

    if source is None:
        raise ConfigError("finetune.lora_rank > 0 needs finetune.init_from (the base run the adapters train on)")
    nnx.update(model, finetune.load_params(source, nnx.to_pure_dict(nnx.state(model))))
    lora.add_adapters(model, finetune_cfg.lora_rank, finetune_cfg.lora_alpha, finetune_cfg.lora_target_list(),
                      seed=seed)
    graphdef, state = nnx.split(model)
    adapters, base = lora.split_params(nnx.to_pure_dict(state))
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), adapters, tx.init(adapters), rng, frozen=base)


def trained_model(graphdef, state: TrainState) -> nnx.Module:
    """The model a TrainState holds, as a plain `Transformer`: a LoRA run's adapters folded into
    its base (what `load_for_inference` gives for the checkpoint), any other run's parameters."""
    model = nnx.merge(graphdef, with_frozen(state.params, state.frozen))
    return lora.merged_model(model) if state.frozen is not None else model
