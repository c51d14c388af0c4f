"""The shell entry points parse (bash -n), and the GPU check's structure stays within its limits."""

import re
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


def test_gpu_check_fits_in_eight_minutes():
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    limits = [int(x) for x in re.findall(r"timeout (?:-k \d+ )?(\d+) ", text)]
    kills = [int(x) for x in re.findall(r"timeout -k (\d+) ", text)]
    # the training runs happen twice (torch and triton backends)
    train = [int(x) for x in re.findall(r"timeout -k \d+ (\d+) python -m train", text)]
    total = sum(limits) + sum(train) + 2 * sum(kills)
    assert total + 20 <= 480, f"GPU check sections add up to {total} s"
