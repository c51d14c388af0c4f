"""Training parts: the optimizer and schedule, data batches, checkpoints, decoding; the CLI lives in
``train.__main__`` / ``train.cli``. The decoding function is ``train.decoding.generate``: the name
``train.generate`` is the sampling CLI's module (``python -m train.generate``), which importing it
binds on this package, so the function is not re-exported under it."""

from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import get_batch, load_tokens
from train.decoding import sample_next
from train.optimizer import AdamW, clip_and_step, clip_grad_norm, get_lr_cosine_schedule, grad_norm_and_clip_scale

__all__ = [
    "AdamW",
    "clip_and_step",
    "clip_grad_norm",
    "grad_norm_and_clip_scale",
    "get_batch",
    "get_lr_cosine_schedule",
    "load_checkpoint",
    "load_tokens",
    "sample_next",
    "save_checkpoint",
]
