"""Batches of (input, target) windows sampled from a flat token array (often an ``np.memmap``):
``get_batch`` for one batch, ``BatchSource`` for the training stream (a pure function of seed and
step, so a resumed run sees the batches an uninterrupted one would) and ``Prefetcher`` to build the
next steps' batches on a background thread."""

from __future__ import annotations

import json
import queue
import threading
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
    from tokenizer.pretokenize import require_file

    path = require_file(path, "token file")
    dtype = np.uint16
    sidecar = path.with_suffix(path.suffix + ".json")
    if sidecar.exists():
        dtype = np.dtype(json.loads(sidecar.read_text())["dtype"])
    size = path.stat().st_size
    if size % np.dtype(dtype).itemsize:
        raise ValueError(f"{path}: size {size} is not a multiple of {np.dtype(dtype).itemsize} ({dtype})")
    if size == 0:
        raise ValueError(f"{path}: the token file is empty (was its text empty?)")
    return np.memmap(path, dtype=dtype, mode="r")


class BatchSource:
    """Batches as a pure function of (seed, step): the global batch's window starts come from
    ``default_rng([seed, step])``, and each rank (and micro-step) takes its own slice of them."""

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        if len(tokens) < context_length + 1:
            raise ValueError(
                f"training data has {len(tokens)} tokens; context_length {context_length} "
                f"needs at least {context_length + 1}"
            )
        self.tokens, self.t, self.b, self.seed = tokens, context_length, batch_size, seed

    def starts(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, step]).integers(0, len(self.tokens) - self.t, size=self.b)

    def micro_batches(self, step: int, rank: int, world: int, accum: int, device: torch.device):
        starts = self.starts(step)
        per = self.b // (world * accum)
        mine = starts[rank * per * accum : (rank + 1) * per * accum]
        return [batch_from_starts(self.tokens, mine[i * per : (i + 1) * per], self.t, device) for i in range(accum)]


class Prefetcher:
    """Builds the next steps' batches on a background thread (gather, pin, async copy)."""

    def __init__(self, make, first_step: int, last_step: int, depth: int = 2):
        self.make, self.q = make, queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(first_step, last_step), daemon=True)
        self.thread.start()

    def _run(self, first: int, last: int) -> None:
        for step in range(first, last):
            if self.stop.is_set():
                return
            try:
                item = (step, self.make(step), None)
            except BaseException as e:  # surface errors in the training thread
                item = (step, None, e)
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def get(self, step: int):
        got, batches, err = self.q.get()
        if err is not None:
            raise err
        assert got == step, f"prefetcher out of order: {got} != {step}"
        return batches

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
