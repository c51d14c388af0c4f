"""Device peaks: a table keyed by device name (datasheet numbers, each with its source) and
on-the-spot measurements (a large device copy; a large bf16 matmul). MFU is reported against both.

Table numbers are dense (no 2:4 sparsity) bf16 tensor-core throughput with fp32 accumulation, and
DRAM bandwidth. Names are matched against ``torch.cuda.get_device_name()``, most specific first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DevicePeak:
    name: str
    bf16_tflops: float
    bandwidth_gbs: float
    source: str


# (substrings that must all appear in the device name, lower-case) -> peak
_TABLE: list[tuple[tuple[str, ...], DevicePeak]] = [
    (
        ("h100", "pcie"),
        DevicePeak(
            "H100 PCIe", 756.0, 2000.0, "NVIDIA H100 datasheet (PCIe): 1513 TFLOPS bf16 with sparsity, 2.0 TB/s"
        ),
    ),
    (
        ("h100", "nvl"),
        DevicePeak("H100 NVL", 835.0, 3900.0, "NVIDIA H100 datasheet (NVL): 1671 TFLOPS bf16 with sparsity, 3.9 TB/s"),
    ),
    (
        ("h100",),
        DevicePeak("H100 SXM", 989.4, 3350.0, "NVIDIA H100 datasheet (SXM): 1979 TFLOPS bf16 with sparsity, 3.35 TB/s"),
    ),
    # "gh200" contains "h200": the more specific entry first (first match wins)
    (
        ("gh200",),
        DevicePeak("GH200", 989.4, 4000.0, "NVIDIA GH200 datasheet: 1979 TFLOPS bf16 with sparsity, 4 TB/s HBM3"),
    ),
    (
        ("h200",),
        DevicePeak("H200", 989.4, 4800.0, "NVIDIA H200 datasheet (SXM): 1979 TFLOPS bf16 with sparsity, 4.8 TB/s"),
    ),
    (
        ("b200",),
        DevicePeak("B200", 2250.0, 8000.0, "NVIDIA HGX B200 datasheet: 4.5 PFLOPS bf16 with sparsity per GPU, 8 TB/s"),
    ),
    (
        ("a100", "pcie", "40"),
        DevicePeak("A100 PCIe 40GB", 312.0, 1555.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1555 GB/s"),
    ),
    (
        ("a100", "pcie"),
        DevicePeak("A100 PCIe 80GB", 312.0, 1935.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1935 GB/s"),
    ),
    (
        ("a100", "40gb"),
        DevicePeak("A100 SXM 40GB", 312.0, 1555.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1555 GB/s"),
    ),
    (("a100",), DevicePeak("A100 SXM 80GB", 312.0, 2039.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 2039 GB/s")),
    (
        ("l40s",),
        DevicePeak(
            "L40S", 362.05, 864.0, "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity), 864 GB/s"
        ),
    ),
    (
        ("rtx 5090",),
        DevicePeak(
            "RTX 5090",
            209.5,
            1792.0,
            "NVIDIA RTX Blackwell GPU architecture whitepaper: 209.5 TFLOPS fp16/bf16 with fp32 accumulate "
            "(dense), 1792 GB/s",
        ),
    ),
    (
        ("rtx 4090",),
        DevicePeak(
            "RTX 4090",
            165.2,
            1008.0,
            "NVIDIA Ada GPU architecture whitepaper: 165.2 TFLOPS fp16/bf16 with fp32 accumulate (dense), 1008 GB/s",
        ),
    ),
]


def lookup_peak(device_name: str) -> DevicePeak | None:
    """The table's entry for a device name such as 'NVIDIA H100 80GB HBM3', or None if unknown."""
    low = device_name.lower()
    for keys, peak in _TABLE:
        if all(k in low for k in keys):
            return peak
    return None


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def measure_copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2**30, iters: int = 20) -> float:
    """GB/s of a device-to-device copy (read + write counted), median over ``iters`` with CUDA events."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = _time_cuda(lambda: dst.copy_(src), iters)
    return 2 * nbytes / (times * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device | str = "cuda", n: int = 8192, iters: int = 20) -> float:
    """TFLOP/s of an n x n x n bf16 matmul (fp32 accumulate), median over ``iters``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _time_cuda(lambda: a @ b, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _time_cuda(fn, iters: int) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]
