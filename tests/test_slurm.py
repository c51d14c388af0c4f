"""Sweeps without Slurm, and on a real one-node Slurm cluster (munged, slurmctld, slurmd on
127.0.0.1) started and stopped by these tests. The cluster tests need Debian's slurm-wlm and munge
(``.ci/run`` installs them) and root; elsewhere they are skipped with the reason."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.errors import STATUS_EXIT
from train.sweep import (
    array_spec,
    configurations,
    load_sweep,
    log_axis,
    plot_swept_settings,
    run_name,
    run_summary,
    swept_series,
    train_args,
)
from train.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "corpus.en"


def write_sweep(tmp_path, name, grid, max_steps, **fixed):
    lines = [
        f'name = "{name}"',
        'preset = "smoke"',
        "max_concurrent = 2",
        "[fixed]",
        'kernels = "torch"',
        'device = "cpu"',
        f'train_text = "{CORPUS}"',
        f'data_dir = "{tmp_path / "data"}"',
        f'out_dir = "{tmp_path / "runs"}"',
        f"max_steps = {max_steps}",
        "sample_tokens = 0",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in fixed.items()]
    lines += ["[grid]"] + [f"{k} = {json.dumps(v)}" for k, v in grid.items()]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_sweep_file_decoding(tmp_path):
    path = write_sweep(tmp_path, "g", {"lr": [1e-3, 3e-3], "use_rope": [True, False]}, 5)
    sweep = load_sweep(path)
    configs = configurations(sweep)
    assert len(configs) == 4 and array_spec(sweep) == "0-3%2"
    assert run_name(sweep, configs[1]) == "g-lr=0.001-use_rope=False"
    args = train_args(sweep, 1)
    assert args[:2] == ["--preset", "smoke"] and "--no-use-rope" in args and args[args.index("--lr") + 1] == "0.001"
    with pytest.raises(IndexError):
        train_args(sweep, 4)
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "smoke"\n[grid]\nlr = []\n')
    with pytest.raises(ValueError, match="non-empty"):
        load_sweep(bad)


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus.en")
def test_sweep_runs_locally_without_slurm_and_summarizes(tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        "loc",
        {"lr": [3e-5, 3e-3, 1e30]},
        12,
        log_interval=4,
        eval_interval=4,
        grad_clip=0,
        warmup_iters=0,
        min_lr=0,
    )
    assert sweep_main(["run", str(path)]) == 1  # the lr=1e30 run diverges
    capsys.readouterr()
    assert sweep_main(["summarize", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0].strip("| ").split(" | ")
    assert header[:2] == ["run", "lr"] and header[-1] == "diverged" and all(header), header  # every column headed
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert set(rows) == {"loc-lr=3e-05", "loc-lr=0.003", "loc-lr=1e+30"}
    assert "DIVERGED" in rows["loc-lr=1e+30"] and "DIVERGED" not in rows["loc-lr=0.003"]
    assert (tmp_path / "runs" / "curves.png").exists() and (tmp_path / "runs" / "swept_value.png").exists()
    # The swept values come from each run's config.json: 3e-05 survives (run names split on '-' lost it).
    summaries = [run_summary(p) for p in sorted((tmp_path / "runs").iterdir()) if p.is_dir()]
    series = swept_series(summaries)
    assert list(series) == ["lr"] and [x for x, _ in series["lr"]][:2] == [3e-5, 3e-3]
    assert plot_swept_settings(summaries, tmp_path / "p.png") == [("lr", "log")]
    assert not log_axis("batch_size", [8, 16]) and log_axis("batch_size", [1, 64])


@pytest.mark.slow
@pytest.mark.skipif(not CORPUS.exists(), reason="needs ../shared/data/corpus.en")
def test_time_budget_is_per_process_so_restarts_keep_progressing(tmp_path):
    """What each requeued allocation does, without Slurm: three --time-budget runs in a row resume
    one another and each makes similar progress (the budget once counted all restarts together:
    the second and third runs trained one step each)."""
    args = ["--preset", "smoke", "--kernels", "torch", "--device", "cpu", "--train-text", str(CORPUS)]
    args += ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--run-name", "b"]
    args += ["--max-steps", "100000", "--log-interval", "10", "--eval-interval", "100000", "--sample-tokens", "0"]
    args += ["--time-budget", "20", "--quiet"]
    summary_file = tmp_path / "runs" / "b" / "summary.json"
    steps = [0]
    for _ in range(3):  # separate processes: the budget counts from the process's start
        r = subprocess.run(
            [sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == STATUS_EXIT["time budget reached"], r.stderr[-2000:]
        summary = json.loads(summary_file.read_text())
        assert summary["status"] == "time budget reached"
        steps.append(summary["step"])
    progress = [b - a for a, b in zip(steps, steps[1:])]
    # Similar progress per allocation (a loaded machine slows each run alike; the old budget gave
    # the second and third runs one step each).
    assert min(progress) >= 3 and min(progress) * 3 >= max(progress), steps
    assert summary["wall_time_total"] >= 3 * 4, summary  # the total across restarts is recorded


# --- a real Slurm cluster ---------------------------------------------------------------------


def _slurm_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmctld/slurmd"
    for b in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(b) is None:
            return f"{b} not installed (apt-get install slurm-wlm munge)"
    if not CORPUS.exists():
        return "needs ../shared/data/corpus.en"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _slurm_available()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("slurm")
    (ROOT / "logs").mkdir(exist_ok=True)  # Slurm opens the jobs' logs there and creates no directory
    out = subprocess.run(
        ["bash", str(ROOT / "slurm" / "local_cluster.sh"), "start", str(d)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    env = {**os.environ, "SLURM_CONF": str(d / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "stop", str(d)], timeout=60)


def _sh(env, *cmd, check=True):
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert not check or r.returncode == 0, r.stderr
    return r.stdout.strip()


def _wait(predicate, timeout, what, env=None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    state = ""
    if env is not None:  # what the cluster was doing, for the failure message
        state = _sh(env, "squeue", "-h", "-o", "%i %T %r", check=False) + "\n" + _sh(env, "sinfo", "-h", check=False)
    tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{state}\n{tail}")


def _submit_sweep(env, sweep_path, job_name, *sbatch_args):
    launcher = _sh(env, "sbatch", f"--job-name={job_name}", *sbatch_args, "slurm/sweep.sh", str(sweep_path)).split()[-1]
    log = ROOT / "logs" / f"{job_name}_{launcher}.out"  # the submitting job is no array: its own id
    _wait(lambda: log.exists() and "Submitted batch job" in log.read_text(), 60, "the array submission")
    array_id = log.read_text().split("Submitted batch job")[-1].split()[0]
    log.unlink()
    return array_id


def _logs(job_name, array_id):
    return sorted((ROOT / "logs").glob(f"{job_name}_{array_id}_*.out"))


@pytest.mark.slow
def test_sbatch_sweep_runs_every_configuration(slurm, tmp_path):
    path = write_sweep(tmp_path, "arr", {"lr": [1e-3, 3e-3, 1e-2]}, 30, log_interval=10, eval_interval=10)
    name = f"t-sweep-{os.getpid()}"
    array_id = _submit_sweep(slurm, path, name)
    _wait(lambda: _sh(slurm, "squeue", "-h", "-j", array_id, check=False) == "", 400, "the array to finish")
    logs = _logs(name, array_id)
    try:
        assert len(logs) == 3, [p.name for p in logs]
        for lr in ["0.001", "0.003", "0.01"]:
            run = tmp_path / "runs" / f"arr-lr={lr}"
            summary = json.loads((run / "summary.json").read_text())
            assert summary["status"] == "finished" and summary["step"] == 30, (run, summary)
            metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
            assert [m["step"] for m in metrics] == [10, 20, 30] and all("val_loss" in m for m in metrics)
        table = _sh(slurm, "python", "-m", "train.sweep", "summarize", str(tmp_path / "runs"))
        assert all(f"arr-lr={lr}" in table for lr in ("0.001", "0.003", "0.01"))
    finally:
        for p in logs:
            p.unlink(missing_ok=True)


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    steps = 150
    path = write_sweep(
        tmp_path, "sig", {"lr": [3e-3]}, steps, log_interval=1, eval_interval=1000, checkpoint_interval=1000
    )
    name = f"t-sig-{os.getpid()}"
    array_id = _submit_sweep(slurm, path, name)
    task = f"{array_id}_0"
    metrics_file = tmp_path / "runs" / "sig-lr=0.003" / "metrics.jsonl"
    _wait(lambda: metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3, 120, "the first steps")
    _sh(slurm, "scancel", "--signal=USR1", task)
    # The task checkpoints, exits 3 and requeues itself. Slurm holds a requeued job until its old
    # job credential expires (cred_expire: 10 s on the test cluster, 120 s by default).
    _wait(lambda: "PENDING" in _sh(slurm, "scontrol", "show", "job", task, check=False), 120, "the requeue")
    ckpts = list((tmp_path / "runs" / "sig-lr=0.003" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].stem.split("_")[1])
    assert 3 <= stopped_at < steps
    _wait(lambda: _sh(slurm, "squeue", "-h", "-j", array_id, check=False) == "", 300, "the resumed task")
    logs = _logs(name, array_id)
    try:
        text = logs[0].read_text()
        assert "restart 1" in text and "requeueing" in text, text[-2000:]
        summary = json.loads((tmp_path / "runs" / "sig-lr=0.003" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["step"] == steps
        logged = [json.loads(l)["step"] for l in metrics_file.read_text().splitlines()]
        assert logged == list(range(1, steps + 1))  # resumed where it stopped: no step lost or repeated
    finally:
        for p in logs:
            p.unlink(missing_ok=True)


def _restart_gaps(log_text: str) -> list[float]:
    """Seconds from each "requeueing ... at T" line of a job's log to the next "started T"."""
    import re
    from datetime import datetime

    events = re.findall(r"(requeueing|started) .*?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", log_text)
    times = [(kind, datetime.strptime(t, "%Y-%m-%d %H:%M:%S")) for kind, t in events]
    return [
        (b[1] - a[1]).total_seconds() for a, b in zip(times, times[1:]) if a[0] == "requeueing" and b[0] == "started"
    ]


# The requeue delay of the test cluster: cred_expire (10 s) plus up to sched_interval (2 s) plus the
# scripts' start; 60 s or more before sched_interval was set (slurm/local_cluster.sh).
RESTART_BOUND_S = 30


@pytest.mark.slow
def test_time_limited_sweep_task_finishes_over_several_allocations(slurm, tmp_path):
    """A task whose run needs three to five allocations of its time limit requeues itself at each
    time budget and finishes at the same step, with the same logged steps, as an unlimited run."""
    steps = 800
    path = write_sweep(
        tmp_path, "lim", {"lr": [3e-3]}, steps, log_interval=50, eval_interval=1000, checkpoint_interval=1000
    )
    # A 1-minute limit with 47 s held back: each allocation gets a --time-budget of about 13 s, of
    # which ~8 s of steps: 160-270 steps at 30-50 ms a step, so 800 take 3-5 allocations (400 steps
    # once took only 2 on an idle machine, at 34 ms). USR1 at 5 s before the limit, after the budget.
    # OMP_NUM_THREADS=4 in the submitting shell: the task still uses its one allocated CPU.
    env = {**slurm, "FASTLM_TIME_RESERVE": "47", "SBATCH_SIGNAL": "USR1@5", "OMP_NUM_THREADS": "4"}
    name = f"t-lim-{os.getpid()}"
    array_id = _submit_sweep(env, path, name, "--time=1")
    from train.cli import main as train_main

    # The same run without a time limit, while the task runs.
    assert train_main(train_args(load_sweep(path), 0, out_dir=str(tmp_path / "ref"))) == 0
    _wait(lambda: _sh(slurm, "squeue", "-h", "-j", array_id, check=False) == "", 400, "the time-limited task", slurm)
    logs = _logs(name, array_id)
    try:
        text = logs[0].read_text()
        run, ref = tmp_path / "runs" / "lim-lr=0.003", tmp_path / "ref" / "lim-lr=0.003"
        summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
        assert summary["status"] == "finished" and summary["step"] == ref_summary["step"] == steps, text[-3000:]
        assert "restart 2" in text and text.count("status: time budget reached") >= 2, text[-3000:]
        assert "1 thread(s): python -m train" in text, text[:2000]
        logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        ref_logged = [json.loads(line)["step"] for line in (ref / "metrics.jsonl").read_text().splitlines()]
        assert sorted(set(logged)) == logged and set(ref_logged) <= set(logged), (logged, ref_logged)
        gaps = _restart_gaps(text)
        assert len(gaps) >= 2 and max(gaps) < RESTART_BOUND_S, gaps
    finally:
        for p in logs:
            p.unlink(missing_ok=True)


@pytest.mark.slow
def test_train_sh_usr1_requeues_and_resumes_then_scancel_stops_it(slurm, tmp_path):
    """train.sh with 2 gloo processes through torchrun: USR1 checkpoints (rank 0), the job requeues
    itself and resumes from its checkpoint; scancel (SIGTERM) checkpoints and ends the job, no requeue."""
    run = tmp_path / "runs" / "tr"
    name = f"t-train-{os.getpid()}"
    args = ["--preset", "smoke", "--kernels", "torch", "--device", "cpu", "--train-text", str(CORPUS)]
    args += ["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--run-name", "tr"]
    args += ["--max-steps", "100000", "--log-interval", "5", "--eval-interval", "100000"]
    args += ["--checkpoint-interval", "100000", "--sample-tokens", "0"]
    env = {**slurm, "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "4"}  # the old fixed 4, from the submitting shell
    job = _sh(env, "sbatch", "--parsable", "--cpus-per-task=2", f"--job-name={name}", "slurm/train.sh", *args)
    job = job.split(";")[0]
    log = ROOT / "logs" / f"{name}_{job}.out"
    metrics = run / "metrics.jsonl"

    def logged_steps():
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []

    try:
        _wait(lambda: len(logged_steps()) >= 2, 180, "the first steps", slurm, log)
        _sh(slurm, "scancel", "--signal=USR1", job)
        _wait(lambda: log.exists() and "restart 1" in log.read_text(), 120, "the requeued job to start", slurm, log)
        ckpts = sorted((run / "checkpoints").glob("*.pt"))
        assert len(ckpts) == 1, ckpts
        stopped_at = int(ckpts[0].stem.split("_")[1])
        text = log.read_text()
        assert "status: interrupted by SIGUSR1" in text and "requeueing" in text, text[-3000:]
        assert "2 process(es), 1 thread(s) each" in text  # the 2 allocated CPUs shared out
        _wait(lambda: any(s > stopped_at + 5 for s in logged_steps()), 180, "steps after the resume", slurm, log)
        _sh(slurm, "scancel", job)
        _wait(
            lambda: _sh(slurm, "squeue", "-h", "-j", job, check=False) == "", 60, "the cancelled job to end", slurm, log
        )
        time.sleep(2)  # squeue is empty once the batch step ends; its last lines follow
        text = log.read_text()
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "interrupted by SIGTERM", (summary, text[-3000:])
        last = max(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("*.pt"))
        assert last > stopped_at + 5 and summary["step"] == last
        assert text.count("requeueing") == 1 and "restart 2" not in text, text[-3000:]
        steps = logged_steps()
        assert steps == sorted(set(steps)) and stopped_at in steps  # resumed where it stopped: no step repeated
        gaps = _restart_gaps(text)
        assert len(gaps) == 1 and gaps[0] < RESTART_BOUND_S, gaps
    finally:
        _sh(slurm, "scancel", job, check=False)
        log.unlink(missing_ok=True)
