"""Faults, bad input and signals against the real ``python -m train`` CLI, in subprocesses.

The run directory must never be lost, silently corrupted or resumed into something else: SIGKILL
at random moments (inside checkpoint writes included: a checkpoint every 2 steps), damaged
checkpoints, divergence, changed settings on resume, read-only and full disks (tiny tmpfs mounts:
CI runs as root, where chmod does not stop a write), and each bad input gets its one-line message.
``FASTLM_FAULT_KILLS`` sets the number of SIGKILL trials (default 6; the goal run uses 50).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SMOKE = ["--preset", "smoke", "--kernels", "torch", "--device", "cpu", "--quiet", "--sample-tokens", "0"]


def train_cmd(out_dir, name, token_file, *extra):
    return [
        sys.executable, "-m", "train", *SMOKE, "--train-data", str(token_file), "--out-dir", str(out_dir),
        "--run-name", name, "--deterministic", *extra,
    ]  # fmt: skip


def run(cmd, timeout=180, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in metrics(run_dir)]


def final_weights(run_dir):
    step, path = max((int(p.stem.split("_")[1]), p) for p in (Path(run_dir) / "checkpoints").glob("step_*.pt"))
    return step, torch.load(path, map_location="cpu", weights_only=False)["model"]


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def temporaries(run_dir):
    return [str(p) for p in Path(run_dir).rglob("*.tmp")]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mount a small tmpfs (optionally read-only); unmounted afterwards."""
    mounted = []

    def mount(name, size="1m", read_only=False):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("needs root and mount(8) for a tmpfs (a full or read-only disk)")
        d = tmp_path / name
        d.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


# --- SIGKILL at random moments ------------------------------------------------------------------


def _written_since(path: Path, t: float) -> bool:
    return path.exists() and path.stat().st_mtime > t


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path, token_file):
    kills = int(os.environ.get("FASTLM_FAULT_KILLS", "6"))
    steps = 10 * kills + 20  # long enough that every kill lands before the run could finish
    extra = ["--max-steps", str(steps), "--checkpoint-interval", "2", "--log-interval", "2", "--eval-interval", "10"]
    t0 = time.time()
    ref = subprocess.Popen(train_cmd(tmp_path, "ref", token_file, *extra), cwd=ROOT, env=ENV, stderr=subprocess.PIPE)
    while ref.poll() is None and not (tmp_path / "ref" / "metrics.jsonl").exists():
        time.sleep(0.02)
    startup = time.time() - t0  # interpreter, imports, data and model set-up
    assert ref.wait(timeout=600) == 0, ref.stderr.read().decode()
    step_s = (time.time() - t0 - startup) / steps
    rng = random.Random(1234)
    cmd = train_cmd(tmp_path, "killed", token_file, *extra)
    done_kills = in_training = mid_write = 0
    mfile = tmp_path / "killed" / "metrics.jsonl"
    while done_kills < kills:
        started = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A third of the kills during start-up (imports, resume), the rest within a dozen steps
        # (six checkpoint writes) of training: those wait for this process's first metrics write
        # (a resume takes longer than the reference run's start, more so on a loaded machine).
        in_startup = rng.random() < 1 / 3
        if in_startup:
            time.sleep(rng.uniform(0.2, startup))
        else:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline and not _written_since(mfile, started):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 12 * step_s))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            done_kills += 1
            proc.wait(timeout=60)
            # In training: this process logged a row. Mid-write: it left a checkpoint's temporary.
            in_training += _written_since(mfile, started)
            mid_write += any((tmp_path / "killed" / "checkpoints").glob("*.tmp"))
        proc.wait(timeout=60)
        summary = tmp_path / "killed" / "summary.json"
        assert not (summary.exists() and json.loads(summary.read_text())["status"] == "finished"), "run too short"
    assert in_training >= kills // 3, f"only {in_training} of {kills} kills landed after training started"
    print(f"{done_kills} kills: {in_training} in training, {mid_write} inside a checkpoint write")
    done = run(cmd, timeout=600)  # the same command once more finishes the run
    assert done.returncode == 0, done.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "ref")  # each step once, the same losses
    (s1, w1), (s2, w2) = final_weights(tmp_path / "ref"), final_weights(tmp_path / "killed")
    assert s1 == s2 == steps and w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "final weights differ from the uninterrupted run"
    assert temporaries(tmp_path / "killed") == []


@pytest.mark.slow
def test_stale_temporaries_are_removed_and_replayed_metrics_appear_once(tmp_path, token_file):
    extra = ["--checkpoint-interval", "4", "--log-interval", "1", "--eval-interval", "100"]
    assert run(train_cmd(tmp_path, "r", token_file, "--max-steps", "8", *extra)).returncode == 0
    d = tmp_path / "r"
    # What a SIGKILL leaves: a half-written checkpoint, and metrics of steps past the last checkpoint.
    (d / "checkpoints" / "step_00000010.pt.x1y2.tmp").write_bytes(b"partial")
    (d / "summary.json.tmp").write_text("{")
    (d / "checkpoints" / "step_00000008.pt").unlink()  # the newest is now step 4; steps 5-8 replay
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_loss"')  # a row cut off mid-write
    r = run(train_cmd(tmp_path, "r", token_file, "--max-steps", "10", *extra))
    assert r.returncode == 0, r.stderr
    assert [row["step"] for row in metrics(d)] == list(range(1, 11))
    assert temporaries(d) == []


# --- damaged checkpoints ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_damaged_newest_checkpoint_is_skipped_by_path(tmp_path, token_file, damage):
    extra = ["--checkpoint-interval", "3", "--log-interval", "3", "--keep-checkpoints", "3"]
    assert run(train_cmd(tmp_path, "d", token_file, "--max-steps", "6", *extra)).returncode == 0
    newest = tmp_path / "d" / "checkpoints" / "step_00000006.pt"
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    r = run(train_cmd(tmp_path, "d", token_file, "--max-steps", "9", *extra))
    assert r.returncode == 0, r.stderr
    assert f"skipping damaged checkpoint {newest}" in r.stderr
    assert "resumed from" in r.stderr and "step_00000003.pt at step 3" in r.stderr


@pytest.mark.slow
def test_a_damaged_newer_checkpoint_is_set_aside_not_kept_by_pruning(tmp_path, token_file):
    extra = ["--checkpoint-interval", "2", "--log-interval", "2", "--keep-checkpoints", "1"]
    assert run(train_cmd(tmp_path, "n", token_file, "--max-steps", "2", *extra)).returncode == 0
    ckpts = tmp_path / "n" / "checkpoints"
    (ckpts / "step_00000010.pt").write_bytes(os.urandom(2048))  # newer than anything trained
    r = run(train_cmd(tmp_path, "n", token_file, "--max-steps", "4", *extra))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004.pt", "step_00000010.pt.damaged"]


@pytest.mark.slow
def test_refused_resume_leaves_the_runs_tokenizer_alone(tmp_path, shared_data):
    cmd = [sys.executable, "-m", "train", *SMOKE, "--train-text", str(shared_data / "corpus.en")]
    cmd += ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path), "--run-name", "tk"]
    assert run([*cmd, "--max-steps", "2", "--checkpoint-interval", "2"]).returncode == 0
    vocab = (tmp_path / "tk" / "tokenizer" / "vocab.json").read_bytes()
    r = run([*cmd, "--max-steps", "4", "--vocab-size", "400"])  # another tokenizer: refused
    assert r.returncode == 1 and "--vocab-size: 512 -> 400" in r.stderr
    assert (tmp_path / "tk" / "tokenizer" / "vocab.json").read_bytes() == vocab


@pytest.mark.slow
def test_no_usable_checkpoint_is_one_clear_error(tmp_path, token_file):
    assert run(train_cmd(tmp_path, "z", token_file, "--max-steps", "2", "--checkpoint-interval", "2")).returncode == 0
    (tmp_path / "z" / "checkpoints" / "step_00000002.pt").write_bytes(b"")
    r = run(train_cmd(tmp_path, "z", token_file, "--max-steps", "4", "--checkpoint-interval", "2"))
    assert r.returncode == 1
    assert "no usable checkpoint in" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_explicit_bad_checkpoint_names_the_file(tmp_path, token_file):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run(train_cmd(tmp_path, "e", token_file, "--max-steps", "2", "--resume", str(bad)))
    assert r.returncode == 1
    assert str(bad) in one_line_error(r.stderr)


# --- divergence ------------------------------------------------------------------------------


@pytest.mark.slow
def test_divergence_keeps_a_finite_checkpoint_and_a_lower_lr_resumes_from_it(tmp_path, token_file):
    # At lr 100 the weight decay alone flips and grows the weights 8.7x a step: non-finite by step 8.
    extra = ["--checkpoint-interval", "2", "--log-interval", "1", "--warmup-iters", "0"]
    r = run(train_cmd(tmp_path, "div", token_file, "--max-steps", "40", "--lr", "100", "--min-lr", "0", *extra))
    assert r.returncode == 2, r.stderr
    assert "non-finite" in r.stderr and "is finite" in r.stderr
    ckpts = sorted((tmp_path / "div" / "checkpoints").glob("step_*.pt"))
    from train.checkpoint import all_finite

    for p in ckpts:  # every checkpoint left on disk holds a finite state
        state = torch.load(p, map_location="cpu", weights_only=False)
        assert all_finite(state["model"], state["optimizer"]), p
    assert json.loads((tmp_path / "div" / "summary.json").read_text())["status"] == "diverged"
    assert ckpts, r.stderr
    again = run(train_cmd(tmp_path, "div", token_file, "--max-steps", "40", "--lr", "1e-4", "--min-lr", "0", *extra))
    assert f"resumed from {ckpts[-1]}" in again.stderr
    assert "--lr: 100.0 -> 0.0001" in again.stderr  # the change is allowed and reported
    assert again.returncode == 0, again.stderr
    assert metrics(tmp_path / "div")[-1]["step"] == 40


@pytest.mark.slow
def test_a_finite_but_doomed_state_is_not_checkpointed(tmp_path, token_file):
    # The case: after a step at lr 1e6 every tensor is finite, but the next gradients are
    # not. No checkpoint of that state is written, so the rerun with a sane lr starts over.
    extra = ["--checkpoint-interval", "2", "--log-interval", "1", "--warmup-iters", "0"]
    r = run(train_cmd(tmp_path, "doom", token_file, "--max-steps", "8", "--lr", "1e6", "--min-lr", "0", *extra))
    assert r.returncode == 2, r.stderr
    assert not list((tmp_path / "doom" / "checkpoints").glob("step_*.pt")) and "no checkpoint was written" in r.stderr
    again = run(train_cmd(tmp_path, "doom", token_file, "--max-steps", "8", "--lr", "1e-3", "--min-lr", "0", *extra))
    assert again.returncode == 0, again.stderr
    assert [row["step"] for row in metrics(tmp_path / "doom")] == list(range(1, 9))


def test_all_finite_catches_nan_and_inf_in_any_tensor():
    from train.checkpoint import all_finite

    sd = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    assert all_finite(sd, {"state": {0: {"exp_avg": torch.ones(4)}}}, torch.tensor(1.5))
    assert not all_finite(sd, {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}})
    assert not all_finite(sd, torch.tensor(float("inf")))
    assert all_finite({"big": torch.full((8,), 3e38)})  # large but finite: no overflow in the check


# --- resume refusals ---------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_never_refuses_an_existing_run_and_touches_nothing(tmp_path, token_file):
    assert run(train_cmd(tmp_path, "old", token_file, "--max-steps", "4", "--checkpoint-interval", "2")).returncode == 0
    before = {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file() and p.name != ".lock"}
    r = run(train_cmd(tmp_path, "old", token_file, "--max-steps", "2", "--resume", "never"))
    assert r.returncode == 1
    assert "--run-name" in one_line_error(r.stderr)
    after = {p: p.read_bytes() for p in (tmp_path / "old").rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before


@pytest.mark.parametrize(
    "change, listed",
    [
        (["--num-heads", "2"], "--num-heads: 4 -> 2"),
        (["--no-use-rope"], "--use-rope: True -> False"),
        (["--seed", "7"], "--seed: 0 -> 7"),
    ],
)
@pytest.mark.slow
def test_resume_with_changed_model_or_data_settings_is_refused(tmp_path, token_file, change, listed):
    assert run(train_cmd(tmp_path, "c", token_file, "--max-steps", "2", "--checkpoint-interval", "2")).returncode == 0
    config = (tmp_path / "c" / "config.json").read_text()
    summary = (tmp_path / "c" / "summary.json").read_text()
    r = run(train_cmd(tmp_path, "c", token_file, "--max-steps", "4", *change))
    assert r.returncode == 1
    assert listed in one_line_error(r.stderr)
    assert (tmp_path / "c" / "config.json").read_text() == config
    # The refused attempt trained nothing: the run's record stays the finished attempt's.
    assert (tmp_path / "c" / "summary.json").read_text() == summary
    assert json.loads(summary)["status"] == "finished"


@pytest.mark.slow
def test_safe_changes_on_resume_are_recorded(tmp_path, token_file):
    assert run(train_cmd(tmp_path, "s", token_file, "--max-steps", "2", "--checkpoint-interval", "2")).returncode == 0
    r = run(train_cmd(tmp_path, "s", token_file, "--max-steps", "4", "--log-interval", "1"))
    assert r.returncode == 0, r.stderr
    resumes = json.loads((tmp_path / "s" / "config.json").read_text())["resumes"]
    assert resumes[-1]["step"] == 2 and "--max-steps: 2 -> 4" in resumes[-1]["changed"]


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.slow
def test_vocab_follows_a_smaller_trained_tokenizer_and_samples_are_written(tmp_path, shared_data):
    text = tmp_path / "tiny.txt"
    text.write_text((shared_data / "tinystories_sample.txt").read_text())
    cmd = [
        sys.executable, "-m", "train", "--preset", "smoke", "--kernels", "torch", "--device", "cpu", "--quiet",
        "--train-text", str(text), "--vocab-size", "1000", "--context-length", "16", "--batch-size", "4",
        "--max-steps", "3", "--sample-tokens", "8", "--out-dir", str(tmp_path / "runs"), "--run-name", "v",
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    r = run(cmd)
    assert r.returncode == 0, r.stderr
    assert "the model's vocab_size follows it (1000 ->" in r.stderr
    vocab = json.loads((tmp_path / "runs" / "v" / "config.json").read_text())["model"]["vocab_size"]
    assert vocab < 1000
    assert (tmp_path / "runs" / "v" / "samples.txt").read_text().count("=== sample") == 2


@pytest.mark.slow
def test_empty_special_token_is_refused(tmp_path, token_file):
    r = run(train_cmd(tmp_path, "sp", token_file, "--max-steps", "2", "--special-token", ""))
    assert r.returncode == 1
    assert "special_token" in one_line_error(r.stderr)


@pytest.mark.slow
def test_wrong_typed_config_value_names_the_file_and_setting(tmp_path, token_file):
    cfg = tmp_path / "run.toml"
    cfg.write_text('lr = "fast"\n')
    r = run(train_cmd(tmp_path, "t", token_file, "--config", str(cfg)))
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert str(cfg) in line and "lr must be a float" in line and "'fast'" in line


@pytest.mark.slow
def test_usage_error_has_its_own_exit_code(tmp_path, token_file):
    r = run(train_cmd(tmp_path, "u", token_file, "--max-steps", "two"))
    assert r.returncode == 64 and "invalid int value" in r.stderr


@pytest.mark.slow
def test_read_only_run_directory_is_one_line(tmp_path, token_file, mount_tmpfs):
    ro = mount_tmpfs("ro", read_only=True)
    r = run(train_cmd(ro, "x", token_file, "--max-steps", "2"))
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert str(ro / "x") in line and "--out-dir" in line


@pytest.mark.slow
def test_read_only_data_directory_is_one_line(tmp_path, shared_data, mount_tmpfs):
    ro = mount_tmpfs("rodata", read_only=True)
    cmd = [sys.executable, "-m", "train", *SMOKE, "--train-text", str(shared_data / "corpus.en")]
    cmd += ["--data-dir", str(ro / "cache"), "--out-dir", str(tmp_path), "--run-name", "rd", "--max-steps", "2"]
    r = run(cmd)
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert str(ro / "cache") in line and "--data-dir" in line


@pytest.mark.slow
def test_full_disk_at_checkpoint_is_one_line_and_leaves_no_partial_file(tmp_path, token_file, mount_tmpfs):
    small = mount_tmpfs("small", size="400k")
    r = run(train_cmd(small, "f", token_file, "--max-steps", "2", "--checkpoint-interval", "2"))
    assert r.returncode == 1
    line = one_line_error(r.stderr)
    assert "no space left on device" in line and str(small / "f" / "checkpoints") in line
    summary = json.loads((small / "f" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 1 and "no space" in summary["error"]
    assert temporaries(small / "f") == [] and list((small / "f" / "checkpoints").glob("*.pt")) == []


def test_internal_errors_keep_their_traceback(tmp_path, token_file, monkeypatch, capsys):
    from train import trainer
    from train.cli import main

    def broken(self, *a, **kw):
        raise RuntimeError("a bug in the step")

    monkeypatch.setattr(trainer.Trainer, "train_step", broken)
    code = main([*SMOKE, "--train-data", str(token_file), "--out-dir", str(tmp_path), "--max-steps", "2"])
    err = capsys.readouterr().err
    assert code == 70 and "Traceback" in err and "a bug in the step" in err
    summary = json.loads(next(tmp_path.glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and summary["exit_code"] == 70


# --- signals ---------------------------------------------------------------------------------


def _start_and_wait_for_training(cmd, run_dir, rows=2):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    mfile = Path(run_dir) / "metrics.jsonl"
    while time.time() < deadline and not (mfile.exists() and len(mfile.read_text().splitlines()) >= rows):
        time.sleep(0.1)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 4), (signal.SIGTERM, 4)])
def test_sigint_and_sigterm_checkpoint_and_exit_interrupted(tmp_path, token_file, sig, code):
    extra = ["--max-steps", "2000", "--log-interval", "1", "--checkpoint-interval", "1000"]
    proc = _start_and_wait_for_training(train_cmd(tmp_path, "g", token_file, *extra), tmp_path / "g")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["status"] == f"interrupted by {sig.name}" and summary["exit_code"] == code
    assert list((tmp_path / "g" / "checkpoints").glob("step_*.pt"))


@pytest.mark.slow
def test_signal_during_data_preparation_ends_with_a_summary(tmp_path, shared_data):
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        text = (shared_data / "corpus.en").read_text()
        for _ in range(120):  # ~16 MB: data preparation takes seconds
            f.write(text)
    cmd = [
        sys.executable, "-m", "train", "--preset", "smoke", "--kernels", "torch", "--device", "cpu",
        "--train-text", str(big), "--max-steps", "5", "--out-dir", str(tmp_path / "runs"), "--run-name", "p",
        "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (tmp_path / "runs" / "p" / ".lock").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    summary = json.loads((tmp_path / "runs" / "p" / "summary.json").read_text())
    assert summary["status"] == "interrupted by SIGUSR1" and summary["step"] == 0
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, token_file):
    # Two gloo processes under torchrun; SIGUSR1 reaches rank 1 only. The ranks agree at the next
    # log interval: one checkpoint (rank 0's), both exit with the paused code at the same step.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29544"]
    cmd += train_cmd(tmp_path, "two", token_file, "--max-steps", "3000", "--log-interval", "2")[1:]
    cmd += ["--checkpoint-interval", "1000", "--batch-size", "8", "--eval-interval", "1000"]
    proc = _start_and_wait_for_training(cmd, tmp_path / "two")
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    ranks = {}
    for pid in workers:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])] = int(pid)
    os.kill(ranks[1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["status"] == "interrupted by SIGUSR1", err[-2000:]
    ckpts = list((tmp_path / "two" / "checkpoints").glob("step_*.pt"))
    assert [int(p.stem.split("_")[1]) for p in ckpts] == [summary["step"]]
    assert "exitcode  : 3" in err or "exitcode: 3" in err or proc.returncode == 3, err[-2000:]
