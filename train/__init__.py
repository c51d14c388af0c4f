"""Training parts: the optimizer and schedule, data batches, checkpoints, decoding; the CLI lives in
``train.__main__`` / ``train.cli``."""

from train.checkpoint import load_checkpoint, save_checkpoint
from train.data import get_batch, load_tokens
from train.decoding import generate, sample_next
from train.optimizer import AdamW, clip_and_step, clip_grad_norm, get_lr_cosine_schedule, grad_norm_and_clip_scale

__all__ = [
    "AdamW",
    "clip_and_step",
    "clip_grad_norm",
    "grad_norm_and_clip_scale",
    "generate",
    "get_batch",
    "get_lr_cosine_schedule",
    "load_checkpoint",
    "load_tokens",
    "sample_next",
    "save_checkpoint",
]
