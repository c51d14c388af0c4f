"""Benchmark session set-up: the device, its peaks (table and measured), and the results file.

``pytest bench --benchmark-only`` runs what the machine can: on a CPU the tokenizer and CPU model
benchmarks (GPU-only ones are skipped with the reason), on a GPU all of them. Rows go to
``bench/results/local/`` (ignored by git; ``--bench-record`` or BENCH_RECORD=1: ``bench/results/``,
or ``$BENCH_RESULTS_DIR``) with the device, versions and commit.
"""

import json
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
    parser.addoption(
        "--bench-record",
        action="store_true",
        help="write results to bench/results/ (committed), not bench/results/local/",
    )


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--bench-quick") or os.environ.get("BENCH_QUICK") == "1"


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if GPU else "cpu")


def pytest_collection_finish(session):
    # The GPU check's fault injection (GPU_CHECK_INJECT, tests only): this benchmark process
    # flushes a row and a line, then hangs or raises, as a broken section would.
    if not os.environ.get("GPU_CHECK_INJECT_HERE"):
        return
    from bench.gpu_check import inject_here
    from bench.results import ResultsWriter

    writer = ResultsWriter("cuda" if GPU else "cpu")
    term = session.config.pluginmanager.get_plugin("terminalreporter")
    where = os.environ.get("GPU_CHECK_SECTION", "bench")
    inject_here(where, lambda row: writer.add(**row), lambda s: (term.write_line(s), term.flush()))


def _peaks_file() -> dict | None:
    """The ceilings the GPU check measured once in its device section (BENCH_PEAKS_FILE), so each
    benchmark session does not measure them again."""
    path = os.environ.get("BENCH_PEAKS_FILE")
    if not path or not os.path.exists(path):
        return None
    facts = json.loads(open(path).read())
    return facts if facts.get("copy_gbs") else None


@pytest.fixture(scope="session")
def peaks(device):
    """Table and measured peaks for this device (None on a CPU); ``from_file``: measured earlier."""
    from bench.peaks import device_name, lookup_peak, measure_copy_bandwidth, measure_matmul_tflops

    if device.type != "cuda":
        return {"table": None, "copy_gbs": None, "matmul_tflops": None}
    table = lookup_peak(device_name(device))
    known = _peaks_file()
    if known:
        return {"table": table, "copy_gbs": known["copy_gbs"], "matmul_tflops": known["matmul_tflops"], "from_file": 1}
    return {
        "table": table,
        "copy_gbs": measure_copy_bandwidth(device),
        "matmul_tflops": measure_matmul_tflops(device),
    }


@pytest.fixture(scope="session")
def results(request, device, peaks):
    from bench.results import ResultsWriter

    writer = ResultsWriter(device, record=request.config.getoption("--bench-record"))
    if not peaks.get("from_file") and (peaks["table"] is not None or peaks["copy_gbs"] is not None):
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
