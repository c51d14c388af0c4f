"""The shell entry points parse (bash -n), and the GPU check's structure stays within its limits."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    [*ROOT.glob("slurm/*.sh"), *ROOT.glob("scripts/*.sh"), ROOT / "bench" / "gpu_check.sh", ROOT / ".ci" / "run"]
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_gpu_check_fits_in_its_slot():
    # The runner enforces its total budget itself (tests/test_gpu_check.py runs it on the CPU); the
    # default leaves the machine's start and the transfers room inside a 10-minute command, and the
    # files it returns room under the device tool's 8.
    from bench.gpu_check import DEFAULT_BUDGET_S, MAX_FILES

    assert DEFAULT_BUDGET_S <= 420 and MAX_FILES <= 6
    assert "exec python3 -m bench.gpu_check" in (ROOT / "bench" / "gpu_check.sh").read_text()
