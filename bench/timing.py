"""Timing: CUDA events via ``triton.testing.do_bench`` (median after warm-up) on a GPU; the host
clock (median of repeats) only for CPU benchmarks."""

from __future__ import annotations

import statistics
import time

import torch


def time_ms(fn, device: torch.device | str, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds per call of ``fn``. ``warmup``/``rep`` are milliseconds on a GPU
    (do_bench's convention) and call counts on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(max(1, warmup // 25)):
        fn()
    times = []
    for _ in range(max(3, rep // 20)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_bytes(fn, device: torch.device | str) -> int | None:
    """Peak device memory allocated during one call of ``fn`` above what was allocated before."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
