"""Batches of (input, target) windows sampled from a flat token array (often an ``np.memmap``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch


def get_batch(
    dataset: npt.NDArray,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    generator: np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` windows uniformly: inputs x[i:i+T], targets x[i+1:i+T+1] (LongTensors)."""
    if dataset.ndim != 1:
        raise ValueError(f"dataset must be a 1-D token array, got shape {dataset.shape}")
    if not np.issubdtype(dataset.dtype, np.integer):
        raise TypeError(f"dataset must hold integer token ids, got dtype {dataset.dtype}")
    n = len(dataset)
    if n < context_length + 1:
        raise ValueError(
            f"dataset has {n} tokens; a batch with context_length={context_length} needs at least {context_length + 1}"
        )
    rng = generator if generator is not None else np.random.default_rng()
    starts = rng.integers(0, n - context_length, size=batch_size)
    return batch_from_starts(dataset, starts, context_length, device)


def batch_from_starts(
    dataset: npt.NDArray, starts: npt.NDArray, context_length: int, device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows starting at ``starts``: one gather from the (memory-mapped) array."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context_length + 1, dtype=np.int64)
    window = torch.from_numpy(np.asarray(dataset[idx], dtype=np.int64))
    device = torch.device(device)
    if device.type == "cuda":
        window = window.pin_memory().to(device, non_blocking=True)
    else:
        window = window.to(device)
    return window[:, :-1], window[:, 1:]


def load_tokens(path: str | Path) -> np.memmap:
    """Memory-map a token file written by ``python -m tokenizer encode`` (dtype from its JSON sidecar)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"token file not found: {path}")
    dtype = np.uint16
    sidecar = path.with_suffix(path.suffix + ".json")
    if sidecar.exists():
        dtype = np.dtype(json.loads(sidecar.read_text())["dtype"])
    if path.stat().st_size % np.dtype(dtype).itemsize:
        raise ValueError(
            f"{path}: size {path.stat().st_size} is not a multiple of {np.dtype(dtype).itemsize} ({dtype})"
        )
    return np.memmap(path, dtype=dtype, mode="r")
