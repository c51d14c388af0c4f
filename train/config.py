"""Run configuration and presets for ``python -m train``.

A run is a ``ModelConfig`` (the network) plus a ``RunConfig`` (data, optimizer, schedule, duration,
evaluation, checkpoints, system). Presets are plain functions returning both; every field can then
be overridden from a JSON/TOML config file and from the command line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kernels import BACKENDS
from model.config import ModelConfig


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_model(model, mode: str = "default"):
    """torch.compile with one of COMPILE_MODES ("default" leaves torch's own default)."""
    import torch

    return torch.compile(model, mode=None if mode == "default" else mode)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    # data
    train_data: str | None = _f(None, "token file from 'python -m tokenizer encode' (np.memmap)")
    valid_data: str | None = _f(None, "validation token file (default: the last 5%% of the training tokens)")
    train_text: str | None = _f(None, "raw training text: trains a BPE and encodes it once, cached by content hash")
    valid_text: str | None = _f(None, "raw validation text, encoded with the tokenizer trained on --train-text")
    dataset: str | None = _f(None, "download and prepare a known dataset: tinystories or owt")
    dataset_mirror: str | None = _f(None, "base URL replacing the dataset host (for mirrors and tests)")
    tokenizer: str | None = _f(None, "tokenizer directory, for samples when training from token files")
    data_dir: str = _f("data", "where downloads and prepared token files are cached")
    special_token: str = _f("<|endoftext|>", "document separator and stop token")
    init_from: str | None = _f(
        None,
        "Hugging Face Llama directory (python -m train.export's, or a Llama this model can express): the run "
        "starts from its weights, model settings and tokenizer",
    )
    # optimization
    batch_size: int = _f(64, "sequences per optimizer step, across all GPUs and accumulation steps")
    grad_accum: int = _f(1, "micro-batches per optimizer step (memory vs. step time)")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "final learning rate of the cosine schedule")
    warmup_iters: int = _f(200, "linear warmup steps")
    lr_decay_iters: int | None = _f(None, "step where the cosine reaches min_lr (default: the run's last step)")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "max global gradient L2 norm (0 disables)")
    # duration
    max_steps: int | None = _f(None, "optimizer steps to run")
    max_tokens: int | None = _f(
        None, "tokens to train on (sets max_steps = max_tokens / (batch_size * context_length))"
    )
    time_budget: float | None = _f(None, "wall-clock seconds: stop cleanly (final eval + checkpoint) before this")
    # evaluation and logging
    eval_interval: int = _f(500, "steps between validation evaluations")
    eval_batches: int = _f(20, "fixed validation batches per evaluation")
    log_interval: int = _f(
        50, "steps between metric logs (the loop reads the device only at logs, evals and checkpoints)"
    )
    # checkpoints
    out_dir: str = _f("runs", "parent directory of run directories")
    run_name: str | None = _f(None, "run directory name (default: preset and time)")
    checkpoint_interval: int = _f(1000, "steps between checkpoints")
    keep_checkpoints: int = _f(2, "how many recent checkpoints to keep")
    resume: str = _f("auto", "'auto' (resume if the run directory has a checkpoint), 'never', or a checkpoint path")
    # system
    device: str | None = _f(None, "cuda, cuda:N or cpu (default: cuda when available)")
    kernels: str = _f("triton", "op backend: triton (fused kernels, GPU) or torch (reference)")
    dtype: str = _f("bf16", "compute dtype on GPU: bf16 (autocast, fp32 master weights) or fp32; CPU runs fp32")
    compile: bool = _f(False, "torch.compile the model")
    compile_mode: str = _f(
        "default",
        "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs: far fewer launches, for small "
        "models whose steps wait on the host), max-autotune, max-autotune-no-cudagraphs",
    )
    seed: int = _f(0, "seed for initialization and data order")
    deterministic: bool = _f(
        False,
        "bit-identical runs and resumes: one CPU thread, torch's deterministic algorithms, a fixed cuBLAS workspace",
    )
    fsdp: bool = _f(False, "shard parameters and optimizer state with FSDP2 instead of DDP (multi-GPU)")
    wandb: bool = _f(False, "log to Weights & Biases (needs the wandb package)")
    wandb_project: str = _f("fastlm", "Weights & Biases project")
    # sampling
    sample_prompt: str = _f("Once upon a time", "prompt for the samples written at the end")
    sample_tokens: int = _f(256, "max new tokens per sample (0 disables samples)")
    num_samples: int = _f(2, "samples written at the end")
    temperature: float = _f(0.8, "sampling temperature")
    top_p: float = _f(0.95, "nucleus sampling threshold")

    def __post_init__(self) -> None:
        positive = [
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_batches",
            "log_interval",
            "checkpoint_interval",
            "keep_checkpoints",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {', '.join(BACKENDS)}; got {self.kernels!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"dtype must be 'bf16' or 'fp32', got {self.dtype!r}")
        if self.dataset not in (None, "tinystories", "owt"):
            raise ValueError(f"dataset must be 'tinystories' or 'owt', got {self.dataset!r}")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ValueError("time_budget must be positive")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.special_token:
            raise ValueError("special_token must not be empty (it separates documents and stops samples)")

    def to_dict(self) -> dict:
        return asdict(self)


# Keys a run's config.json holds beside its settings (derived, or the run's history): --config skips them.
CONFIG_DERIVED_KEYS = ("max_steps", "world_size", "flops_per_token", "tokenizer_dir", "params", "data", "resumes")

# Settings a resumed run may change: they alter neither the model, nor the data stream (a pure
# function of seed, batch size and data), nor the tokenizer. Everything else, every model field
# included, must match the checkpoint, or the resume is refused with the list of differences.
SAFE_ON_RESUME = frozenset(
    {
        # duration, intervals, output
        "max_steps", "max_tokens", "time_budget", "eval_interval", "eval_batches", "log_interval",
        "checkpoint_interval", "keep_checkpoints", "resume", "out_dir", "run_name", "data_dir",
        "dataset_mirror", "wandb", "wandb_project",
        # optimization: lowering the learning rate after a divergence is the common case
        "lr", "min_lr", "warmup_iters", "lr_decay_iters", "weight_decay", "beta1", "beta2", "eps",
        "grad_clip", "grad_accum",
        # system: same math, other speed or precision
        "device", "kernels", "dtype", "compile", "compile_mode", "fsdp", "deterministic",
        # sampling at the end
        "sample_prompt", "sample_tokens", "num_samples", "temperature", "top_p",
    }
)  # fmt: skip


def resume_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's settings with this run's: (refused, allowed) lines of
    ``name: saved -> current``. ``saved``/``current`` are ``{"model": {...}, "run": {...}}``."""
    refused, allowed = [], []
    for section in ("model", "run"):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for name in sorted(set(old) | set(new)):
            if name not in new or name not in old or old[name] == new[name]:
                continue  # settings only one side knows (older or newer code) are not compared
            line = f"{'--' + name.replace('_', '-')}: {old.get(name)!r} -> {new[name]!r}"
            (allowed if section == "run" and name in SAFE_ON_RESUME else refused).append(line)
    return refused, allowed


def read_settings_file(path: str | Path, what: str = "config file") -> dict:
    """A TOML (``.toml``) or JSON file as a dict; a clear error when it does not exist or parse."""
    from tokenizer.pretokenize import require_file

    p = require_file(path, what)
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"{p}: cannot read {what}: {e.strerror}") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except ValueError as e:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise ValueError(f"{p}: cannot parse {what}: {e}") from None


# --- presets ----------------------------------------------------------------------------------


def _tinystories() -> tuple[ModelConfig, dict]:
    model = ModelConfig(
        vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344, rope_theta=10_000.0
    )
    return model, dict(
        dataset="tinystories", batch_size=64, max_tokens=327_680_000, lr=1e-3, min_lr=1e-4, warmup_iters=500
    )


def _owt() -> tuple[ModelConfig, dict]:
    model, run = _tinystories()
    model.vocab_size = 32_000
    return model, {**run, "dataset": "owt", "sample_prompt": "The history of"}


def _gpt2(d_model: int, layers: int, heads: int) -> tuple[ModelConfig, dict]:
    model = ModelConfig(
        vocab_size=50_257, context_length=1024, d_model=d_model, num_layers=layers, num_heads=heads, d_ff=4 * d_model
    )
    return model, dict(
        dataset="owt",
        batch_size=32,
        max_tokens=2_621_440_000,
        lr=6e-4,
        min_lr=6e-5,
        warmup_iters=700,
        sample_prompt="The history of",
    )


def _smoke() -> tuple[ModelConfig, dict]:
    model = ModelConfig(vocab_size=512, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=176)
    return model, dict(
        batch_size=16,
        max_steps=200,
        lr=3e-3,
        min_lr=3e-4,
        warmup_iters=20,
        eval_interval=50,
        eval_batches=4,
        log_interval=10,
        checkpoint_interval=100,
        sample_tokens=48,
        kernels="torch",
    )


PRESETS = {
    "tinystories": _tinystories,
    "owt": _owt,
    "gpt2-small": lambda: _gpt2(768, 12, 12),
    "gpt2-medium": lambda: _gpt2(1024, 24, 16),
    "gpt2-large": lambda: _gpt2(1280, 36, 20),
    "gpt2-xl": lambda: _gpt2(1600, 48, 25),
    "smoke": _smoke,
}


def preset(name: str) -> tuple[ModelConfig, dict]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
