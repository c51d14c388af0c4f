"""Test set-up: without a GPU, Triton kernels run in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module
imports ``kernels``.
"""

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in the GPU check script)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh random inputs per test, reproducible from the test's name.
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def token_file(tmp_path_factory, shared_data):
    """corpus.en encoded with a small BPE, shared by the tests below."""
    from tokenizer.cli import main as tok_main

    d = tmp_path_factory.mktemp("tok")
    assert (
        tok_main(
            [
                "train",
                "--input",
                str(shared_data / "corpus.en"),
                "--vocab-size",
                "512",
                "--special-token",
                "<|endoftext|>",
                "--out",
                str(d / "tok"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        tok_main(
            [
                "encode",
                "--tokenizer",
                str(d / "tok"),
                "--input",
                str(shared_data / "corpus.en"),
                "--out",
                str(d / "train.bin"),
                "--quiet",
            ]
        )
        == 0
    )
    return d / "train.bin"
