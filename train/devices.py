"""Devices: their names and their datasheet peaks, the denominators of every MFU this project reports.

Peaks are dense (no 2:4 sparsity): bf16 tensor-core throughput with fp32 accumulation, plain fp32
throughput (no TF32), and DRAM bandwidth, each with its source. Names are matched against
``torch.cuda.get_device_name()``, most specific first. The trainer (MFU in the logs) and the
benchmarks (MFU and % of peak in the reports) both read this table; the benchmarks also measure
peaks on the spot (``bench.peaks``).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class DevicePeak:
    """Dense peaks of one device: bf16 tensor-core TFLOP/s (fp32 accumulate), fp32 TFLOP/s (plain
    fp32, no TF32: what ``--dtype fp32`` matmuls run at by default), DRAM GB/s, and where they come from.
    ``fp32_tflops`` is None where the source gives no dense fp32 figure."""

    name: str
    bf16_tflops: float
    bandwidth_gbs: float
    source: str
    fp32_tflops: float | None = None

    def tflops(self, dtype: str) -> float | None:
        """The peak for a run computing in ``dtype`` ("bf16"/"fp16" tensor cores, or "fp32")."""
        if dtype in ("bf16", "fp16"):
            return self.bf16_tflops
        if dtype == "fp32":
            return self.fp32_tflops
        raise ValueError(f"no peak for dtype {dtype!r}; known: bf16, fp16, fp32")


# (substrings that must all appear in the device name, lower-case) -> peak.
# fp32 figures: the same datasheets' "FP32" (non-tensor) lines; B200's gives none per GPU.
_TABLE: list[tuple[tuple[str, ...], DevicePeak]] = [
    (
        ("h100", "pcie"),
        DevicePeak(
            "H100 PCIe",
            756.0,
            2000.0,
            "NVIDIA H100 datasheet (PCIe): 1513 TFLOPS bf16 with sparsity, 2.0 TB/s",
            fp32_tflops=51.0,
        ),
    ),
    (
        ("h100", "nvl"),
        DevicePeak(
            "H100 NVL",
            835.0,
            3900.0,
            "NVIDIA H100 datasheet (NVL): 1671 TFLOPS bf16 with sparsity, 3.9 TB/s",
            fp32_tflops=60.0,
        ),
    ),
    (
        ("h100",),
        DevicePeak(
            "H100 SXM",
            989.4,
            3350.0,
            "NVIDIA H100 datasheet (SXM): 1979 TFLOPS bf16 with sparsity, 3.35 TB/s",
            fp32_tflops=67.0,
        ),
    ),
    # "gh200" contains "h200": the more specific entry first (first match wins)
    (
        ("gh200",),
        DevicePeak(
            "GH200",
            989.4,
            4000.0,
            "NVIDIA GH200 datasheet: 1979 TFLOPS bf16 with sparsity, 4 TB/s HBM3",
            fp32_tflops=67.0,
        ),
    ),
    (
        ("h200",),
        DevicePeak(
            "H200",
            989.4,
            4800.0,
            "NVIDIA H200 datasheet (SXM): 1979 TFLOPS bf16 with sparsity, 4.8 TB/s",
            fp32_tflops=67.0,
        ),
    ),
    (
        ("b200",),
        DevicePeak("B200", 2250.0, 8000.0, "NVIDIA HGX B200 datasheet: 4.5 PFLOPS bf16 with sparsity per GPU, 8 TB/s"),
    ),
    (
        ("a100", "pcie", "40"),
        DevicePeak(
            "A100 PCIe 40GB", 312.0, 1555.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1555 GB/s", fp32_tflops=19.5
        ),
    ),
    (
        ("a100", "pcie"),
        DevicePeak(
            "A100 PCIe 80GB", 312.0, 1935.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1935 GB/s", fp32_tflops=19.5
        ),
    ),
    (
        ("a100", "40gb"),
        DevicePeak(
            "A100 SXM 40GB", 312.0, 1555.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 1555 GB/s", fp32_tflops=19.5
        ),
    ),
    (
        ("a100",),
        DevicePeak(
            "A100 SXM 80GB", 312.0, 2039.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 2039 GB/s", fp32_tflops=19.5
        ),
    ),
    (
        ("l40s",),
        DevicePeak(
            "L40S",
            362.05,
            864.0,
            "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity), 864 GB/s",
            fp32_tflops=91.6,
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
            fp32_tflops=104.8,
        ),
    ),
    (
        ("rtx 4090",),
        DevicePeak(
            "RTX 4090",
            165.2,
            1008.0,
            "NVIDIA Ada GPU architecture whitepaper: 165.2 TFLOPS fp16/bf16 with fp32 accumulate (dense), 1008 GB/s",
            fp32_tflops=82.6,
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
    """'NVIDIA H100 80GB HBM3' for a GPU, 'CPU (x86_64)' for the host."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def model_flops_utilization(
    tokens_per_s: float | None, flops_per_token: float, peak: DevicePeak | None, dtype: str
) -> float | None:
    """MFU: model FLOPs per second (``flops_per_token``: 6N plus attention, no recompute, causal
    counted dense) over the peak of the dtype the run computes in; None without a known peak."""
    peak_tflops = peak.tflops(dtype) if peak is not None else None
    if not tokens_per_s or not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
