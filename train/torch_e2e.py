"""The PyTorch side of `python -m train.bench --end-to-end`: what nanoGPT's train.py does for a
character-level recipe, as one eager PyTorch command, so the whole jaxlm command can be timed
against it.

    python -m train.torch_e2e SPEC.json      # SPEC.json: written by train.bench from a jaxlm recipe

Same data (the text file, nanoGPT's prepare.py: sorted characters, first 90 % train), same model and
initialization (train/torch_baseline.py: nanoGPT's model with jaxlm's config), same AdamW, gradient
clipping and learning-rate schedule (nanoGPT's get_lr), same random-window batches, the same
evaluation schedule as the jaxlm recipe (a `train.eval_batches`-batch validation estimate every
`train.eval_every` steps; nanoGPT's estimate_loss would also evaluate as many train batches), the same
checkpointing (`torch.save` of model + optimizer every `checkpoint.every` steps and at the end, as
nanoGPT's ckpt.pt), then what the jaxlm command does at the end: the mean loss over the whole
validation split (non-overlapping windows) and `train.sample_tokens` new characters for each of 3
samples of the prompt (nanoGPT's generate: no KV cache, the context cropped to the block size,
temperature 0.8). Writes summary.json (val_loss, wall time) and samples.txt into the spec's out_dir.

This module imports torch and numpy only (not jax: its resident set is PyTorch's alone).
"""

from __future__ import annotations

import json
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train import torch_baseline


def get_lr(it: int, o: dict) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr over decay_steps, then min_lr."""
    if it < o["warmup_steps"]:
        return o["lr"] * (it + 1) / (o["warmup_steps"] + 1)
    if it > o["decay_steps"]:
        return o["min_lr"]
    ratio = (it - o["warmup_steps"]) / max(o["decay_steps"] - o["warmup_steps"], 1)
    return o["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o["lr"] - o["min_lr"])


def prepare(path: str, val_fraction: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """nanoGPT's data/shakespeare_char/prepare.py: character vocabulary, uint16 ids, 90/10 split."""
    text = Path(path).read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    return stoi, ids[:n], ids[n:]


def get_batch(data: np.ndarray, batch: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: `batch` random windows of L tokens and their next tokens."""
    ix = torch.randint(len(data) - L, (batch,))
    x = torch.stack([torch.from_numpy(data[i:i + L].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + L].astype(np.int64)) for i in ix.tolist()])
    return x, y


@torch.no_grad()
def estimate_val_loss(model, val: np.ndarray, batches: int, batch: int, L: int) -> float:
    model.eval()
    losses = []
    for _ in range(batches):
        x, y = get_batch(val, batch, L)
        logits = model(x)
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def whole_split_loss(model, val: np.ndarray, batch: int, L: int) -> float:
    """Mean loss over every validation target once (windows [kL, kL+L), the last one shorter)."""
    model.eval()
    starts = np.arange(0, len(val) - 1, L)
    total, count = 0.0, 0
    for b in range(0, len(starts), batch):
        rows = starts[b:b + batch]
        x = torch.zeros((len(rows), L), dtype=torch.int64)
        y = torch.full((len(rows), L), -100, dtype=torch.int64)  # -100: ignored (padding)
        for r, s in enumerate(rows):
            n = min(L, len(val) - 1 - s)
            x[r, :n] = torch.from_numpy(val[s:s + n].astype(np.int64))
            y[r, :n] = torch.from_numpy(val[s + 1:s + 1 + n].astype(np.int64))
        logits = model(x)
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((y != -100).sum())
    model.train()
    return total / count


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, block: int, temperature: float = 0.8) -> torch.Tensor:
    """nanoGPT's GPT.generate: crop the context to the block size, sample the next token."""
    model.eval()
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block:])[:, -1, :] / temperature
        idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
    return idx


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    m, o, t, d = spec["model"], spec["optim"], spec["train"], spec["data"]
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(t["seed"])
    stoi, train, val = prepare(d["path"], d["val_fraction"])
    itos = {i: c for c, i in stoi.items()}
    L, B = d["seq_len"], t["batch_size"]
    model = torch_baseline.TorchGPT(types.SimpleNamespace(**{**m, "vocab_size": m["vocab_size"] or len(stoi)}))
    opt = torch_baseline.make_optimizer(model, o["lr"], (o["beta1"], o["beta2"]), o["weight_decay"], o["eps"])
    ckpt = out / "ckpt.pt"
    for it in range(t["steps"]):
        lr = get_lr(it, o)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = get_batch(train, B, L)
        loss = torch_baseline.train_step(model, opt, x, y, o["clip_norm"])
        done = it + 1
        if done % t["log_every"] == 0 or done == t["steps"]:
            line = f"step {done}: loss {loss.item():.4f}"
            if t["eval_every"] and done % t["eval_every"] == 0:
                line += f", val estimate {estimate_val_loss(model, val, t['eval_batches'], B, L):.4f}"
            print(line, flush=True)
        if spec["checkpoint_every"] and done % spec["checkpoint_every"] == 0 or done == t["steps"]:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": done,
                        "config": spec}, ckpt)
    val_loss = whole_split_loss(model, val, B, L)
    if t["sample_tokens"]:  # jaxlm's default prompt: the first 16 validation tokens
        ids = [stoi[c] for c in t["sample_prompt"]] if t["sample_prompt"] else val[:16].tolist()
        prompt = torch.tensor([ids] * 3, dtype=torch.int64)
        rows = generate(model, prompt, t["sample_tokens"], m["max_seq_len"]).tolist()
        sep = "\n" + "=" * 72 + "\n"
        (out / "samples.txt").write_text(sep.join("".join(itos[i] for i in r) for r in rows) + "\n")
    summary = {"step": t["steps"], "val_loss": val_loss, "wall_time_s": time.perf_counter() - t_start,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: step {t['steps']}  val_loss {val_loss:.4f}  run {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
