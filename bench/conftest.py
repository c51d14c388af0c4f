"""Benchmark session set-up: the device, its peaks (table and measured), and the results file.

``pytest bench --benchmark-only`` runs what the machine can: on a CPU the tokenizer and CPU model
benchmarks (GPU-only ones are skipped with the reason), on a GPU all of them. Rows go to
``bench/results/`` (or ``$BENCH_RESULTS_DIR``) with the device, versions and commit.
"""

import os

import pytest
import torch

GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not GPU, reason="GPU benchmark: no CUDA device on this machine")


def pytest_configure(config):
    # Print why each benchmark was skipped (GPU-only ones on a CPU machine).
    if "s" not in config.option.reportchars:
        config.option.reportchars += "s"


def pytest_addoption(parser):
    parser.addoption("--bench-quick", action="store_true", help="fewer shapes and repeats (for CI smoke runs)")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--bench-quick") or os.environ.get("BENCH_QUICK") == "1"


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if GPU else "cpu")


@pytest.fixture(scope="session")
def peaks(device):
    """Table and measured peaks for this device (None on a CPU)."""
    from bench.peaks import device_name, lookup_peak, measure_copy_bandwidth, measure_matmul_tflops

    if device.type != "cuda":
        return {"table": None, "copy_gbs": None, "matmul_tflops": None}
    table = lookup_peak(device_name(device))
    return {
        "table": table,
        "copy_gbs": measure_copy_bandwidth(device),
        "matmul_tflops": measure_matmul_tflops(device),
    }


@pytest.fixture(scope="session")
def results(device, peaks):
    from bench.results import ResultsWriter

    writer = ResultsWriter(device)
    if peaks["table"] is not None or peaks["copy_gbs"] is not None:
        table = peaks["table"]
        writer.add(
            kind="peaks",
            table={f: getattr(table, f) for f in table.__slots__} if table else None,
            measured_copy_gbs=peaks["copy_gbs"],
            measured_matmul_tflops=peaks["matmul_tflops"],
        )
    yield writer
    path = writer.write()
    if path is not None:
        print(f"\nbenchmark results written to {path}")
