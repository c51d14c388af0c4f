"""Kernel benchmarks: each op x backend x mode on the presets' shapes, bf16, on a GPU."""

import os

import pytest
import torch

from bench.conftest import GPU, requires_gpu
from bench.kernel_cases import build_cases, run_case

# BENCH_PRESETS=tinystories,gpt2-small limits the model shapes (the GPU check does, for time).
_PRESETS = [p for p in os.environ.get("BENCH_PRESETS", "").split(",") if p] or None
CASES = build_cases(torch.device("cuda"), presets=_PRESETS) if GPU else []
# BENCH_BACKENDS=ours,torch,builtin keeps those backends only (the GPU check runs the torch.compile
# baselines last, since compiling them takes most of the time).
_BACKENDS = [b for b in os.environ.get("BENCH_BACKENDS", "").split(",") if b] or None
PARAMS = [
    pytest.param(case, backend, mode, id=f"{case.op}[{case.shape}]-{backend}-{mode}")
    for case in CASES
    for backend in case.backends
    for mode in case.modes
    if _BACKENDS is None or backend in _BACKENDS
]


@requires_gpu
@pytest.mark.parametrize("case,backend,mode", PARAMS or [pytest.param(None, None, None, id="no-gpu")])
def test_kernel(benchmark, case, backend, mode, device, peaks, results, quick):
    row, call = run_case(
        case,
        backend,
        mode,
        device,
        torch.bfloat16,
        peaks["copy_gbs"],
        peaks["matmul_tflops"] * 1e12 if peaks["matmul_tflops"] else None,
        warmup=10 if quick else 25,
        rep=30 if quick else 100,
    )
    results.add(**row)
    benchmark.extra_info.update(row)
    # pytest-benchmark's own table uses the host clock (with a sync per call); the number that
    # counts is row["ms"], from CUDA events after warm-up.
    if call is not None:
        benchmark.pedantic(lambda: (call(), torch.cuda.synchronize()), rounds=5, iterations=1)
    else:
        benchmark.pedantic(torch.cuda.synchronize, rounds=1, iterations=1)
    if "error" in row and backend == "ours" and "16k" not in case.shape:
        pytest.fail(f"our kernel failed: {row['error']}")
