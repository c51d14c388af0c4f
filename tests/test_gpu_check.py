"""The GPU check (bench/gpu_check.sh -> bench.gpu_check): its budget, its limits and what survives a
section that hangs or raises. The whole script runs on the CPU here, its CUDA parts skipped."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_check import MAX_FILES, Check, Section, Step, parse_inject
from bench.gpu_check_sections import GOALS

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "BENCH_"))}
    # `python3` in the script is this interpreter (its venv), as on the GPU box it is the box's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env["GPU_DATA"] = "/nonexistent"
    return {**env, **extra}


@pytest.mark.slow
def test_dry_run_keeps_what_was_measured_through_a_hang_and_an_error(tmp_path):
    out = tmp_path / "out"
    # Each section's limit is its share of the budget: at 80 s the erroring e2e section gets 8 s,
    # room for its pytest process (torch import, collection, the raise, exit) on a loaded 2-core CI
    # machine; at 40 s its 4 s cut the process off before it had exited.
    budget = 80
    t0 = time.monotonic()
    p = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(out)],
        cwd=ROOT,
        env=_env(GPU_CHECK_BUDGET=str(budget), GPU_CHECK_INJECT="kernels:hang,e2e:error"),
        capture_output=True,
        text=True,
        timeout=budget + 60,
    )
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    # Inside its budget (a few seconds' grace for the interpreter's own start and exit).
    assert elapsed <= budget + 5, elapsed
    files = [f for f in out.rglob("*") if f.is_file()]
    assert 0 < len(files) <= MAX_FILES, files
    assert not [f for f in files if f.suffix == ".tmp"]
    assert {"logs.txt", "summary.json", "read_later.tar.gz"} <= {f.name for f in files}

    log = (out / "logs.txt").read_text()
    # The hung section's line, printed before the hang, survived its kill; so did its row.
    assert "injected hang in kernels: this line and its row were written before it" in log
    assert "kernels: cut off at its limit during 'kernels'" in log
    assert "injected error in e2e" in log and "e2e: 'train step' failed" in log
    rows = [r for f in (out / "results").glob("*.json") for r in json.loads(f.read_text())["rows"]]
    assert {(r["where"], r["what"]) for r in rows if r["kind"] == "injected"} == {("kernels", "hang"), ("e2e", "error")}
    # The sections after them still ran, to the end.
    for later in ("tests", "training", "compiled"):
        assert "--- [" in log and f"] {later}: " in log, later
    summary = json.loads((out / "summary.json").read_text())
    assert [g["goal"] for g in summary["goals"]] == [name for name, _ in GOALS]
    assert {g["status"] for g in summary["goals"]} <= {"measured", "failed", "not reached"}
    kernels = next(g for g in summary["goals"] if g["goal"].startswith("kernel rms_norm"))
    assert kernels["status"] == "not reached" and "cut off" in kernels["detail"]
    assert [s["section"] for s in summary["timeline"]] == ["device", "kernels", "e2e", "tests", "training", "compiled"]
    assert "=== summary: one line per goal ===" in log and f"done (budget {budget} s)" in log


def _sleeper(text: str, seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; print({text!r}, flush=True); time.sleep({seconds})"]


def test_a_step_killed_at_its_limit_keeps_its_lines(tmp_path):
    check = Check(tmp_path / "out", budget_s=30)
    res = check.run(Step("sleeper", [_sleeper("measured before the limit", 60)]), limit_s=2.0, section="s")
    assert res.rcs == [None] and res.timed_out
    assert res.lines == ["measured before the limit"]
    assert "measured before the limit" in (tmp_path / "out" / "logs.txt").read_text()
    # Side by side: each writes its own log, kept after the kill too.
    res = check.run(Step("two", [_sleeper("one", 60), _sleeper("two", 0)]), limit_s=2.0, section="s")
    assert res.rcs == [None, 0]
    assert [f.read_text() for f in res.logs] == ["one\n", "two\n"]


def test_a_hung_section_costs_only_its_share_and_later_ones_run(tmp_path):
    def hang(check):
        yield Step("hang", [_sleeper("before the hang", 600)])

    def fails(check):
        yield Step("fails", [[sys.executable, "-c", "raise SystemExit(3)"]])
        yield Step("after the failure", [_sleeper("still runs", 0)])

    def own_limit(check):
        yield Step("warm-up", [_sleeper("warming", 600)], max_s=1.0)
        yield Step("measure", [_sleeper("measured after the warm-up's own limit", 0)])

    def broken(check):
        raise RuntimeError("bookkeeping bug")
        yield

    check = Check(tmp_path / "out", budget_s=20)
    sections = [
        Section("a", "hangs", 1, hang),
        Section("b", "fails", 1, fails),
        Section("c", "broken", 1, broken),
        Section("e", "a step with its own limit", 1, own_limit),
        Section("d", "fine", 1, lambda c: iter([Step("ok", [_sleeper("done", 0)])])),
    ]
    t0 = time.monotonic()
    check.run_sections(sections)
    summary = check.finish([])
    assert time.monotonic() - t0 <= 20 + 3
    status = {s["section"]: s["status"] for s in summary["timeline"]}
    assert status["a"].startswith("cut off") and status["b"].startswith("'fails' failed")
    assert status["c"].startswith("failed: RuntimeError") and status["d"] == "ok" and status["e"] == "ok"
    log = (tmp_path / "out" / "logs.txt").read_text()
    assert "before the hang" in log and "still runs" in log and "done" in log
    assert "'warm-up' stopped at its own limit" in log and "measured after the warm-up's own limit" in log


def test_finish_leaves_at_most_the_file_limit_and_no_tmp(tmp_path, monkeypatch):
    # No .git on the device box: the commit named on the command line stamps the results.
    monkeypatch.setenv("GPU_CHECK_COMMIT", "0123456789abcdef")
    out = tmp_path / "out"
    check = Check(out, budget_s=10)
    for i in range(4):
        (out / "results" / f"r{i}.json").write_text('{"rows": []}')
    (out / "results" / "r9.tmp").write_text("partial")
    (out / "train_metrics.jsonl").write_text("")
    check.finish([])
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= MAX_FILES and not [f for f in files if f.suffix == ".tmp"]
    assert {"logs.txt", "summary.json", "read_later.tar.gz"} <= {f.name for f in files}
    assert "over the 6-file limit" in (out / "logs.txt").read_text()
    (kept,) = (out / "results").glob("*.json")
    assert json.loads(kept.read_text())["meta"] == {
        "git_commit": "0123456789abcdef",
        "git_commit_source": "GPU_CHECK_COMMIT",
    }


def test_bad_budget_and_injection_are_one_line_errors(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", str(tmp_path)],
        cwd=ROOT,
        env=_env(GPU_CHECK_BUDGET="soon"),
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "GPU_CHECK_BUDGET" in p.stderr and "'soon'" in p.stderr
    assert parse_inject("kernels:hang, e2e:error") == {"kernels": "hang", "e2e": "error"}
    with pytest.raises(SystemExit, match="GPU_CHECK_INJECT"):
        parse_inject("kernels:explode")


def test_attention_cases_add_the_nondeterministic_backward_only_where_the_kernel_takes_it(monkeypatch):
    import torch

    from bench import kernel_cases

    def deterministic_only(q, k, v, causal=True):
        return q

    def with_flag(q, k, v, causal=True, deterministic=True):
        return q * (2 if deterministic else 3)

    table = next(t for t in kernel_cases.OP_TABLES if t.op == "attention")
    for fn, expected in ((deterministic_only, False), (with_flag, True)):
        ours = type("Ops", (), {"attention": staticmethod(fn)})()
        case = kernel_cases._table_cases(table, kernel_cases.TINY, True, ours)[0]
        assert ("ours-nondet" in case.backends) is expected
        if expected:
            # its backward only, and it passes deterministic=False through
            assert case.modes_of("ours-nondet") == ("bwd", "fwd+bwd") and case.modes_of("ours") == kernel_cases.MODES
            q = torch.ones(1)
            assert case.backends["ours-nondet"](q, q, q, True).item() == 3


def test_a_table_that_fails_to_build_costs_only_its_cases(monkeypatch):
    import torch

    from bench import kernel_cases

    broken = kernel_cases.OpTable(
        "broken", lambda presets, quick: 1 / 0, str, lambda s, rq, dev: [], len, {"fwd": 1}, lambda ours: {}
    )
    monkeypatch.setattr(kernel_cases, "OP_TABLES", [broken, *kernel_cases.OP_TABLES])
    errors = []
    cases = kernel_cases.build_cases(torch.device("cpu"), quick=True, errors=errors)
    assert errors == ["broken: ZeroDivisionError: division by zero"]
    assert {c.op for c in cases} >= {"rms_norm", "attention", "cross_entropy", "adamw"}
    with pytest.raises(ZeroDivisionError):
        kernel_cases.build_cases(torch.device("cpu"), quick=True)
    # cross-entropy rows are forward and backward together (either alone is part of the work)
    assert {c.modes for c in cases if c.op == "cross_entropy"} == {("fwd+bwd",)}


def _gpu_results(out: Path) -> None:
    meta = {"device": "NVIDIA H200", "device_type": "cuda", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
            "git_commit": "abcdef1234567890", "date": "2026-12-02T00:00:00+00:00"}  # fmt: skip
    kernel = dict(kind="kernel", op="rms_norm", shape="tinystories 16384x512", mode="fwd", dtype="bfloat16")
    rows = [
        dict(kind="peaks", measured_copy_gbs=4300.0, measured_matmul_tflops=790.0),
        {**kernel, "backend": "ours", "ms": 0.0125, "gb_s": 2684.0, "pct_of_peak": 62.4},
        {**kernel, "backend": "torch", "ms": 0.05, "gb_s": 671.0, "pct_of_peak": 15.6},
        dict(
            kind="kernel",
            op="attention",
            shape="long B4 H16 T4096 D128 causal",
            mode="fwd+bwd",
            backend="ours",
            ms=3.0,
            tflops=320.0,
            pct_of_peak=40.5,
        ),  # fmt: skip
        dict(kind="e2e", preset="tinystories", backend="triton", batch_size=64, tokens_per_s=2.0e6, mfu=0.23),
    ]
    (out / "results").mkdir(parents=True)
    (out / "results" / "run.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    goals = [{"goal": "kernel rms_norm", "status": "measured", "detail": "62% of copy bw"}]
    timeline = [{"section": "kernels", "seconds": 90.0, "limit_s": 110.0, "status": "ok"}]
    (out / "summary.json").write_text(json.dumps({"budget_s": 420, "goals": goals, "timeline": timeline}))


def test_ingest_commits_results_and_fills_the_measured_columns(tmp_path):
    from bench.ingest import BEGIN, ingest

    out, results, notes = tmp_path / "out", tmp_path / "results", tmp_path / "NOTES.md"
    _gpu_results(out)
    shutil.copyfile(ROOT / "bench" / "NOTES.md", notes)
    ingest(out, results, notes)
    assert sorted(f.name for f in results.iterdir()) == ["run.json", "run.summary.json"]
    text = notes.read_text()
    rms = next(ln for ln in text.splitlines() if ln.startswith("| RMSNorm 16384 x 512 (TinyStories) | fwd |"))
    assert rms.endswith("| 12.5 us, 2684 GB/s, 62% of measured copy bw (1.60x its floor), 4.00x torch; abcdef1 |")
    # "attention same" is the row above's case
    same = next(ln for ln in text.splitlines() if ln.startswith("| attention same | fwd+bwd |"))
    assert "3.00 ms, 320 TFLOP/s, 40% of measured bf16 matmul" in same
    assert text.count(BEGIN) == 1 and "| kernel rms_norm | measured | 62% of copy bw |" in text
    assert "| tinystories | triton | 64 | 2,000,000 | 23.0% | - |" in text
    ingest(out, results, notes)
    assert notes.read_text() == text  # the same output twice: the same notes


def test_ingest_refuses_what_is_not_a_gpu_check_output(tmp_path):
    from bench.ingest import ingest

    with pytest.raises(SystemExit, match="no results file under"):
        ingest(tmp_path, tmp_path / "r", tmp_path / "NOTES.md")
    out = tmp_path / "out"
    _gpu_results(out)
    data = json.loads((out / "results" / "run.json").read_text())
    data["meta"]["git_commit"] = None
    (out / "results" / "run.json").write_text(json.dumps(data))
    shutil.copyfile(ROOT / "bench" / "NOTES.md", tmp_path / "NOTES.md")
    with pytest.raises(SystemExit, match="records no commit .*GPU_CHECK_COMMIT"):
        ingest(out, tmp_path / "r", tmp_path / "NOTES.md")
    ingest(out, tmp_path / "r", tmp_path / "NOTES.md", commit="feedbeef")
    assert json.loads((tmp_path / "r" / "run.json").read_text())["meta"]["git_commit"] == "feedbeef"


def test_gpu_sections_steps_are_valid_commands(tmp_path, monkeypatch):
    # The CUDA branches the CPU dry run skips: the warm-up's and the training runs' command lines.
    from bench import gpu_check_sections as sections
    from bench.warm import main as warm_main
    from train.cli import resolve

    data = tmp_path / "data"
    data.mkdir()
    (data / "train.bin").write_bytes(b"")
    monkeypatch.setenv("GPU_DATA", str(data))
    check = Check(tmp_path / "out", budget_s=420)
    check.facts["device"] = {"has_cuda": True}
    check.section_deadline = time.monotonic() + 100

    warm = next(sections.kernel_steps(check))
    assert len(warm.argvs) == 4 and 0 < warm.max_s <= 50
    assert warm_main(warm.argvs[0][3:]) == 0  # parses (and, without CUDA, compiles nothing)
    runs = sections.training_steps(check)
    step = next(runs)
    argv = step.argvs[0]
    assert argv[1:3] == ["-m", "train"] and step.max_s == pytest.approx(50, abs=1)
    budget = float(argv[argv.index("--time-budget") + 1])
    assert budget < step.max_s  # stops itself (final eval, samples) before it would be killed
    _, _, run, _ = resolve(argv[3:])
    assert run.time_budget == budget and run.kernels == "torch"
    # The run's metrics come back tagged with its name, and its goal line reads them.
    run_dir = check.work / "runs" / "ts-torch"
    run_dir.mkdir(parents=True)
    records = [{"step": 25, "train_loss": 6.5, "tokens_per_s": 1.5e6}, {"step": 50, "train_loss": 5.0, "val_loss": 5.2}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    triton = next(runs).argvs[0]
    assert triton[triton.index("--kernels") + 1] == "triton"
    tagged = [json.loads(x) for x in (check.out / "train_metrics.jsonl").read_text().splitlines()]
    assert tagged == [{"run": "ts-torch", **r} for r in records]
    status, text = sections._training("torch")([], {}, check.facts)
    assert status == "measured" and text == "step 50, train_loss 5, val_loss 5.2, tokens_per_s 1.5e+06"


def test_goal_lines_say_measured_failed_or_not_reached():
    from bench.gpu_check_sections import _kernel_goal

    ran = Section("kernels", "k", 1, None, status="ok", started_s=1.0)
    cut = Section("kernels", "k", 1, None, status="cut off at its limit during 'kernels'", started_s=1.0)
    cuda = {"device": {"has_cuda": True}}
    row = dict(kind="kernel", op="rms_norm", shape="tinystories 16384x512", mode="fwd")
    rows = [
        {**row, "backend": "torch", "ms": 0.04, "gb_s": 800.0},
        {**row, "backend": "ours", "ms": 0.01, "gb_s": 3200.0, "pct_of_peak": 80.0},
        {**row, "op": "swiglu", "backend": "ours", "error": "out of memory"},
    ]
    status, text = _kernel_goal("rms_norm")(rows, {"kernels": ran}, cuda)
    assert status == "measured" and "3200 GB/s (80% of measured)" in text and "4.00x torch" in text
    assert _kernel_goal("swiglu")(rows, {"kernels": ran}, cuda) == (
        "failed",
        "tinystories 16384x512 fwd: out of memory",
    )
    status, text = _kernel_goal("rope_qk")(rows, {"kernels": cut}, cuda)
    assert status == "not reached" and "cut off" in text
    assert _kernel_goal("rope_qk")(rows, {}, cuda)[0] == "not reached"
    # the section ended well yet wrote no row for the goal: a failure, not silence
    assert _kernel_goal("rope_qk")(rows, {"kernels": ran}, cuda)[0] == "failed"
