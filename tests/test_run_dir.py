"""What a run leaves and shows: a self-contained run directory, settings that load back with
``--config``, progress a person can follow without a terminal, a closing summary, and MFU against
the peak of the dtype the run computes in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import resolve
from train.devices import lookup_peak, model_flops_utilization

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMOKE = ["--preset", "smoke", "--kernels", "torch", "--device", "cpu"]


def settings(argv):
    preset, model, run, _ = resolve(argv)
    return preset, model.to_dict(), run.to_dict()


def test_print_config_output_loads_back_with_config(tmp_path, capsys):
    from train.cli import main

    argv = ["--preset", "smoke", "--lr", "0.02", "--no-use-rope", "--run-name", "x", "--max-steps", "7"]
    assert main([*argv, "--print-config"]) == 0
    printed = tmp_path / "printed.json"
    printed.write_text(capsys.readouterr().out)
    assert settings(["--config", str(printed)]) == settings(argv)


@pytest.mark.slow
def test_a_runs_config_json_loads_back_and_reproduces_the_run(tmp_path, token_file):
    argv = [*SMOKE, "--train-data", str(token_file), "--out-dir", str(tmp_path), "--run-name", "r"]
    argv += ["--max-steps", "2", "--sample-tokens", "0", "--quiet", "--lr", "0.004"]
    r = subprocess.run([sys.executable, "-m", "train", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    config = tmp_path / "r" / "config.json"
    assert settings(["--config", str(config)]) == settings(argv)


@pytest.mark.slow
def test_run_directory_is_self_contained(tmp_path, shared_data):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "train", *SMOKE, "--train-text", str(shared_data / "corpus.en"), "--quiet"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--out-dir", str(runs), "--run-name", "s", "--max-steps", "4"]
    cmd += ["--sample-tokens", "0"]
    assert subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True).returncode == 0
    moved = tmp_path / "elsewhere" / "s"
    shutil.move(runs / "s", moved)
    shutil.rmtree(tmp_path / "data")  # the data cache (and its tokenizer) is gone too
    assert (moved / "tokenizer" / "vocab.json").exists()
    ckpt = next((moved / "checkpoints").glob("step_*.pt"))
    gen = [sys.executable, "-m", "train.generate", "--checkpoint", str(ckpt), "--max-new-tokens", "5"]
    out = subprocess.run(gen, cwd=tmp_path, env=ENV, capture_output=True, text=True)  # from another directory
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time")


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_progress_lines_without_a_terminal_and_a_closing_summary(tmp_path, token_file, quiet):
    cmd = [sys.executable, "-m", "train", *SMOKE, "--train-data", str(token_file), "--out-dir", str(tmp_path)]
    cmd += ["--run-name", "p", "--max-steps", "6", "--log-interval", "2", "--eval-interval", "4"]
    cmd += ["--sample-tokens", "0"] + (["--quiet"] if quiet else [])
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True)  # stderr is a pipe
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("step ")]
    if quiet:
        assert lines == []
    else:
        assert [line.split(" | ")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
        assert all("loss " in line and "tok/s" in line and "ETA" in line for line in lines)
        assert "val " in lines[1]
    assert f"finished at step 6; run directory: {tmp_path / 'p'}" in r.stderr
    assert "final train loss" in r.stderr and "all restarts" in r.stderr


def test_mfu_is_model_flops_over_the_peak_of_the_compute_dtype():
    h100 = lookup_peak("NVIDIA H100 80GB HBM3")
    # By hand: 1e5 tokens/s x 6e9 FLOPs/token = 6e14 FLOP/s, 60.6% of the H100's 989.4 TFLOP/s bf16;
    # 1e4 tokens/s in fp32 is 6e13 FLOP/s, 89.6% of its 67 TFLOP/s fp32 (not 6.1% of the bf16 peak).
    assert model_flops_utilization(1e5, 6e9, h100, "bf16") == pytest.approx(6e14 / 989.4e12)
    assert model_flops_utilization(1e4, 6e9, h100, "fp32") == pytest.approx(6e13 / 67e12)
    assert model_flops_utilization(1e4, 6e9, None, "bf16") is None  # a CPU, or an unknown GPU
    assert model_flops_utilization(1e4, 6e9, lookup_peak("NVIDIA B200"), "fp32") is None  # no fp32 figure


@pytest.mark.slow
def test_env_json_states_the_peak_mfu_is_against(tmp_path, token_file):
    cmd = [sys.executable, "-m", "train", *SMOKE, "--train-data", str(token_file), "--out-dir", str(tmp_path)]
    cmd += ["--run-name", "e", "--max-steps", "1", "--sample-tokens", "0", "--quiet"]
    assert subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True).returncode == 0
    env = json.loads((tmp_path / "e" / "env.json").read_text())
    assert env["compute_dtype"] == "fp32" and env["peak_tflops"] is None  # a CPU run: no MFU claimed
    rows = [json.loads(line) for line in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert all(row.get("mfu") is None for row in rows)
