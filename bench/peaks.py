"""Device peaks measured on the spot: a large device copy (GB/s) and a large bf16 matmul (TFLOP/s).
MFU is reported against both these and the datasheet table (``train.devices``, re-exported here).
"""

from __future__ import annotations

import torch

from bench.timing import time_ms
from train.devices import DevicePeak, device_name, lookup_peak

__all__ = ["DevicePeak", "device_name", "lookup_peak", "measure_copy_bandwidth", "measure_matmul_tflops"]


def measure_copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2**30) -> float:
    """GB/s of a device-to-device copy (read + write counted), median of CUDA-event timings (bench.timing)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device | str = "cuda", n: int = 8192) -> float:
    """TFLOP/s of an n x n x n bf16 matmul (fp32 accumulate), median of CUDA-event timings."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / (ms * 1e-3) / 1e12
