"""Data: corpora, tokenizers, the tensorstore token store and the Grain pipeline (see pipeline.py)."""

from train.data.pipeline import (
    ArrayTokens,
    PreparedData,
    TokenWindows,
    eval_sample_iterator,
    make_train_iterator,
    num_val_batches,
    prepare_data,
    val_batches,
)
from train.data.sources import Corpus, load_corpus
from train.data.store import TokenStore
from model.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, Tokenizer, tokenizer_from_json
from train.data.tokenizers import build_tokenizer, encode_documents

__all__ = [
    "ArrayTokens", "BPETokenizer", "ByteTokenizer", "CharTokenizer", "Corpus", "PreparedData", "TokenStore",
    "TokenWindows", "Tokenizer", "build_tokenizer", "encode_documents", "eval_sample_iterator", "load_corpus",
    "make_train_iterator", "num_val_batches", "prepare_data", "tokenizer_from_json", "val_batches",
]
