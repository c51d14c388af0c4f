"""End-to-end training-step benchmarks per backend and preset, and the largest batch that fits."""

import os

import pytest
import torch

from bench.conftest import requires_gpu
from bench.e2e import largest_batch, run_step_benchmark

GPU_CASES = [
    ("tinystories", "torch", False, None),
    ("tinystories", "torch", True, None),
    ("tinystories", "triton", False, None),
    ("tinystories", "triton", True, None),
    ("gpt2-small", "torch", True, 16),
    ("gpt2-small", "triton", False, 16),
    ("gpt2-small", "triton", True, 16),
]
if os.environ.get(
    "BENCH_E2E"
):  # e.g. BENCH_E2E=tinystories:triton:1,gpt2-small:triton:0,tinystories:triton:reduce-overhead
    GPU_CASES = [
        (p, k, {"0": False, "1": True}.get(c, c), None)
        for p, k, c in (s.split(":") for s in os.environ["BENCH_E2E"].split(","))
    ]


@requires_gpu
@pytest.mark.parametrize("preset_name,kernels,compile,batch", GPU_CASES, ids=lambda v: str(v))
def test_train_step_gpu(benchmark, preset_name, kernels, compile, batch, device, peaks, results, quick):
    table = peaks["table"]
    row = run_step_benchmark(
        preset_name,
        kernels,
        device,
        compile,
        batch,
        peak=table,  # MFU against the peak of the dtype the step runs in
        measured_peak_flops=peaks["matmul_tflops"] * 1e12 if peaks["matmul_tflops"] else None,
        warmup=10 if quick else 25,
        rep=30 if quick else 100,
    )
    results.add(**row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(torch.cuda.synchronize, rounds=1, iterations=1)
    assert "error" not in row, row["error"]


@requires_gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_largest_batch_gpu(benchmark, kernels, device, results):
    b = largest_batch("tinystories", kernels, device, start=64, limit=2048)
    row = results.add(kind="largest_batch", preset="tinystories", backend=kernels, batch_size=b)
    benchmark.extra_info.update(row)
    benchmark.pedantic(torch.cuda.synchronize, rounds=1, iterations=1)
    assert b >= 1


def test_train_step_cpu(benchmark, device, results):
    """CPU-meaningful: the smoke preset's training step on the torch backend (host clock)."""
    if device.type != "cpu":
        pytest.skip("covered by the GPU benchmarks")
    row = run_step_benchmark("smoke", "torch", device, breakdown=True, warmup=25, rep=100)
    assert "error" not in row, row.get("error")
    results.add(**row)
    benchmark.extra_info.update(row)
    from bench.e2e import make_step

    step, _, _ = make_step("smoke", "torch", device)
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
