"""Kernel benchmarks: each op x backend x mode on the presets' shapes, bf16, on a GPU.

Each row is written to the results file as measured and printed as one line (``pytest -s``), with
its ratio to the torch eager baseline measured earlier in the same session."""

import os

import pytest
import torch

from bench.conftest import GPU, requires_gpu
from bench.kernel_cases import build_cases, run_case

# BENCH_PRESETS=tinystories,gpt2-small limits the model shapes (the GPU check does, for time).
_PRESETS = [p for p in os.environ.get("BENCH_PRESETS", "").split(",") if p] or None
BUILD_ERRORS: list[str] = []  # an op table that fails to build is one failing test, not a collection error
CASES = build_cases(torch.device("cuda"), presets=_PRESETS, errors=BUILD_ERRORS) if GPU else []
# BENCH_BACKENDS=ours,torch,builtin keeps those backends only (the GPU check runs the torch.compile
# baselines last, since compiling them takes most of the time).
_BACKENDS = [b for b in os.environ.get("BENCH_BACKENDS", "").split(",") if b] or None
PARAMS = [
    pytest.param(case, backend, mode, id=f"{case.op}[{case.shape}]-{backend}-{mode}")
    for case in CASES
    for backend in case.backends
    for mode in case.modes_of(backend)
    if _BACKENDS is None or backend in _BACKENDS
]
_TORCH_MS: dict = {}  # (op, shape, mode) -> ms of the torch baseline in this session


def row_line(row: dict) -> str:
    """One printed line per measured row: what, how fast, against what."""
    what = f"{row['op']} [{row['shape']}] {row['backend']} {row['mode']}"
    if row.get("error"):
        return f"row {what}: {row['error']}"
    val = f"{row['tflops']:.1f} TFLOP/s" if "tflops" in row else f"{row['gb_s']:.0f} GB/s"
    pct = f", {row['pct_of_peak']:.0f}% of measured peak" if row.get("pct_of_peak") else ""
    ref = _TORCH_MS.get((row["op"], row["shape"], row["mode"]))
    ratio = f", {ref / row['ms']:.2f}x torch" if ref and row["backend"] != "torch" else ""
    return f"row {what}: {row['ms']:.4f} ms, {val}{pct}{ratio}"


@pytest.mark.parametrize("error", BUILD_ERRORS or [None], ids=lambda e: "build" if e is None else e.split(":")[0])
def test_kernel_cases_build(error):
    assert error is None, f"benchmark cases not built: {error}"


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
    if backend == "torch" and row.get("ms"):
        _TORCH_MS[(case.op, case.shape, mode)] = row["ms"]
    ref = _TORCH_MS.get((case.op, case.shape, mode))
    if ref and row.get("ms") and backend != "torch":
        row["vs_torch"] = ref / row["ms"]
    results.add(**row)
    print("\n" + row_line(row), flush=True)
    benchmark.extra_info.update(row)
    # pytest-benchmark's own table uses the host clock (with a sync per call); the number that
    # counts is row["ms"], from CUDA events after warm-up.
    if call is not None:
        benchmark.pedantic(lambda: (call(), torch.cuda.synchronize()), rounds=5, iterations=1)
    else:
        benchmark.pedantic(torch.cuda.synchronize, rounds=1, iterations=1)
    if "error" in row and backend.startswith("ours") and "16k" not in case.shape:
        pytest.fail(f"our kernel failed: {row['error']}")
