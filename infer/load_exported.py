"""Run an artifact written by `python -m infer export` with only jax and numpy installed.

    python -m infer.load_exported model.jaxlm --ids 5 6 7 --max-new-tokens 100
    art = ExportedModel("model.jaxlm"); art.generate([[5, 6, 7]], max_new_tokens=100)   # greedy

This module imports nothing from jaxlm's model, flax or the training code. Greedy generation
follows `infer.sampler.generate_long`: prompts left-padded into a window of P = max_seq_len // 2
tokens (longer prompts keep their last P), one prefill, then one decode call per token; when the
token to feed would take the last position (max_seq_len - 1), the last P tokens are prefilled
again. Rows slide together, as in the sampler. The tokenizer travels in the artifact's metadata
(`meta["tokenizer"]`); decoding text needs jaxlm's tokenizers, token ids do not.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np


class ExportedModel:
    def __init__(self, path: str):
        with np.load(path, allow_pickle=False) as z:
            self.meta = json.loads(bytes(z["meta"]).decode())
            if self.meta.get("format") != "jaxlm-export-1":
                raise ValueError(f"{path}: not a jaxlm export artifact")
            self._prefill = jax.export.deserialize(bytearray(z["prefill"].tobytes()))
            self._decode = jax.export.deserialize(bytearray(z["decode"].tobytes()))
        self.B, self.P, self.S = self.meta["batch"], self.meta["prompt_window"], self.meta["max_seq_len"]

    def _prefill_window(self, rows: list[list[int]]):
        tokens = np.zeros((self.B, self.P), np.int32)
        positions = np.full((self.B, self.P), -1, np.int32)
        for i, r in enumerate(rows):
            r = r[-self.P:]
            tokens[i, self.P - len(r):] = r
            positions[i, self.P - len(r):] = np.arange(len(r))
        logits, *cache = self._prefill.call(tokens, positions)
        return logits, cache, np.max(positions, axis=1) + 1

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of up to `batch` prompts by max_new_tokens tokens each."""
        if not 1 <= len(prompts) <= self.B:
            raise ValueError(f"give 1 to {self.B} prompts (the artifact was exported for batch {self.B})")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must not be empty")
        rows = [list(p) for p in prompts] + [[0]] * (self.B - len(prompts))
        if max(len(r) for r in rows) + max_new_tokens > self.S:  # as generate_long: long prompts keep their last P
            rows = [r[-self.P:] for r in rows]
        new: list[list[int]] = [[] for _ in rows]
        logits, cache, positions = self._prefill_window(rows)
        for step in range(max_new_tokens):
            token = np.argmax(np.asarray(logits), axis=-1).astype(np.int32)  # (B,)
            for i, t in enumerate(token):
                new[i].append(int(t))
            if step + 1 == max_new_tokens:
                break
            if positions.max() >= self.S - 1:  # slide: prefill the last P tokens of every row
                logits, cache, positions = self._prefill_window([r + n for r, n in zip(rows, new)])
            else:
                logits, *cache = self._decode.call(token, positions.astype(np.int32), *cache)
                positions = positions + 1
        return new[:len(prompts)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.load_exported", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--ids", type=int, nargs="+", required=True, help="prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    try:
        out = ExportedModel(args.artifact).generate([args.ids], args.max_new_tokens)[0]
    except (OSError, ValueError) as e:
        print(f"python -m infer.load_exported: error: {e}", file=sys.stderr)
        return 2
    print(" ".join(map(str, out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
