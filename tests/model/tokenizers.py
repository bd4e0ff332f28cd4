"""Tokenizers the model tests share."""

from __future__ import annotations

from model.tokenizer import BPETokenizer

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def hf_style_bpe(texts: list[str], vocab_size: int) -> BPETokenizer:
    """An imported-style byte-level BPE: special tokens <s>, </s>, <|im_start|>, <|im_end|>, the
    non-special added tokens [INST]/[/INST] (as some Hugging Face tokenizers have) and an rstrip
    special token <|eot|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken("[INST]", special=False, normalized=False),
                    AddedToken("[/INST]", special=False, normalized=False)])
    tok.add_special_tokens([AddedToken("<|eot|>", rstrip=True)])
    return BPETokenizer(tok)
