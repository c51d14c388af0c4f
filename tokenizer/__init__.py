"""Byte-level BPE: the trainer, the ``Tokenizer``, the corpus encoder and the CLI (``python -m tokenizer``)."""

from tokenizer.bpe_train import train_bpe
from tokenizer.special import validate_special_tokens
from tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "train_bpe", "validate_special_tokens"]
