"""The GPU check's sections (in order of value) and goals, run by ``bench.gpu_check``.

Each section is a generator of steps; a step's limit is what is left of the section's share. A
section's own bookkeeping between steps (reading collected test ids, tagging training metrics) is
plain Python here and costs no process.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

from bench.gpu_check import PY, ROOT, Step, inject_here

BENCH_FLAGS = ["-q", "-s", "-p", "no:cacheprovider", "--continue-on-collection-errors", "-rfE"]
# Each test times itself with CUDA events (bench.timing); pytest-benchmark's own rounds are skipped.
BENCH_FLAGS += ["--benchmark-disable"]
PYTEST = [PY, "-m", "pytest"]
_NOISE = re.compile(
    r"^(-{10,}|Name |Legend|  Outliers|  OPS|=+ warnings summary|\s*$|.*Warning: |\s+warnings\.warn\(|-- Docs: "
    r"|.*: \d+ warnings?$)"
)


def _show(line: str) -> bool:
    return not _NOISE.match(line)


def _cuda(check) -> bool:
    return bool(check.facts.get("device", {}).get("has_cuda"))


# -- 1. device facts and the two measured ceilings -------------------------------------------
def device_steps(check):
    query = "name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version"
    yield Step("nvidia-smi", [["nvidia-smi", f"--query-gpu={query}", "--format=csv"]], max_s=10, optional=True)
    yield Step("versions and ceilings", [[PY, "-m", "bench.gpu_check", "device", str(check.work / "peaks.json")]])
    try:
        check.facts["device"] = json.loads((check.work / "peaks.json").read_text())
    except (OSError, ValueError):
        check.facts["device"] = {"has_cuda": False, "error": "device facts not written"}


def device_facts(peaks_path: Path) -> int:
    """``python3 -m bench.gpu_check device PEAKS_JSON``: versions, device properties and the
    measured ceilings (a peaks row in the results; the JSON for the later benchmark sessions)."""
    import torch

    from bench.results import ResultsWriter
    from train.provenance import provenance

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    facts = {**{k: v for k, v in provenance(device).items() if k != "date"}, "has_cuda": cuda}
    peaks_path.write_text(json.dumps(facts, default=str))
    print(json.dumps(facts, default=str), flush=True)
    writer = ResultsWriter(device)
    inject_here("device", lambda row: writer.add(**row), lambda s: print(s, flush=True))
    if not cuda:
        print("no CUDA device: ceilings not measured (a CPU dry run)", flush=True)
        return 0
    from bench.peaks import lookup_peak, measure_copy_bandwidth, measure_matmul_tflops

    props = torch.cuda.get_device_properties(device)
    facts.update(
        sms=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
        l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
    )
    print(f"{props.name}: {facts['sms']} SMs, {facts['memory_gib']} GiB, L2 {facts['l2_mb']} MB", flush=True)
    facts["copy_gbs"] = measure_copy_bandwidth(device)
    print(f"copy bandwidth (read + write, 1 GiB): {facts['copy_gbs']:.0f} GB/s", flush=True)
    facts["matmul_tflops"] = measure_matmul_tflops(device)
    print(f"bf16 matmul 8192^3 (random data): {facts['matmul_tflops']:.0f} TFLOP/s", flush=True)
    table = lookup_peak(str(props.name))
    writer.add(
        kind="peaks",
        table={f: getattr(table, f) for f in table.__slots__} if table else None,
        measured_copy_gbs=facts["copy_gbs"],
        measured_matmul_tflops=facts["matmul_tflops"],
    )
    peaks_path.write_text(json.dumps(facts, default=str))
    return 0


# -- 2. kernels at the goal shapes --------------------------------------------------------------
def _liger_path(check) -> None:
    """Pure-Python wheels carried in $GPU_DATA/wheels (Liger-Kernel): a wheel is a zip, so unpacking
    it onto the path installs it without pip or network."""
    wheels = sorted((Path(os.environ.get("GPU_DATA", ROOT / ".gpu_data")) / "wheels").glob("*.whl"))
    site = check.work / "site"
    for w in wheels:
        zipfile.ZipFile(w).extractall(site)
    if wheels:
        check.env["PYTHONPATH"] = f"{site}{os.pathsep}{check.env['PYTHONPATH']}"
        check.log(f"  carried wheels on the path: {', '.join(w.name for w in wheels)}")


def kernel_steps(check):
    _liger_path(check)
    if _cuda(check):
        # Compiling autotuned configs is CPU work, one config at a time per process: 4 processes
        # fill Triton's disk cache with the benchmark shapes and the GPU tests' shapes meanwhile.
        shards = [[PY, "-m", "bench.warm", "--shard", str(i), "--shards", "4", "--tests"] for i in range(4)]
        # Not lost time: what it leaves uncompiled, the benchmarks compile themselves, one at a time.
        yield Step("warm-up", shards, max_s=0.45 * check.section_left())
        for log in check.last.logs:
            for line in log.read_text(errors="replace").splitlines()[-6:]:
                check.log(f"  warm: {line}")
    env = {"BENCH_BACKENDS": "ours,ours-nondet,torch,builtin,liger", "GPU_CHECK_SECTION": "kernels"}
    yield Step("kernels", [[*PYTEST, *BENCH_FLAGS, "bench/test_bench_kernels.py"]], env=env, show=_show)


# -- 3. end to end, eager ---------------------------------------------------------------------
def e2e_steps(check):
    env = {"BENCH_E2E": "tinystories:torch:0,tinystories:triton:0", "GPU_CHECK_SECTION": "e2e"}
    yield Step("train step", [[*PYTEST, *BENCH_FLAGS, "bench/test_bench_e2e.py", "-k", "train_step_gpu"]], env, _show)


# -- 4. GPU correctness tests -------------------------------------------------------------------
def test_steps(check):
    yield Step(
        "collect", [[*PYTEST, "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests"]], show=_err
    )
    ids = [ln for ln in check.last.lines if "::" in ln and not ln.startswith(("ERROR", "FAILED"))]
    check.facts["tests"] = {"collected": len(ids)}
    if not ids:
        return
    n = min(4, len(ids)) if _cuda(check) else 1
    cmd = [*PYTEST, "-v", "--tb=short", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    # Outcomes are read from the shards' own log files below (also after a kill at the limit).
    yield Step("gpu tests", [[*cmd, *ids[i::n]] for i in range(n)], show=lambda line: False)
    counts = dict.fromkeys(("PASSED", "FAILED", "ERROR", "SKIPPED"), 0)
    for log in check.last.logs:
        text = log.read_text(errors="replace").splitlines()
        done = False
        for line in text:
            m = re.match(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", line)
            if m:
                counts[m.group(2)] += 1
                if m.group(2) in ("FAILED", "ERROR"):
                    check.log(f"  {m.group(2)} {m.group(1)}")
            elif line.startswith("E  "):
                check.log(f"    {line[:200]}")
            done = done or bool(re.match(r"^=+ .* in [0-9.]+s", line))
        if not done:
            running = [ln for ln in text if re.match(r"^tests/.*::", ln) and not ln.rstrip().endswith(("%]",))]
            check.log(f"  {log.name}: cut off while running {(running or ['(nothing started)'])[-1][:160]}")
    check.facts["tests"].update({k.lower(): v for k, v in counts.items()})
    check.log(f"  {len(ids)} GPU tests: " + ", ".join(f"{v} {k.lower()}" for k, v in counts.items()))


def _err(line: str) -> bool:
    return line.startswith(("ERROR", "E ", "Traceback", "INTERNALERROR")) or "rror:" in line


TRAIN_FIELDS = ("step", "train_loss", "val_loss", "tokens_per_s", "mfu")


# -- 5. training runs ---------------------------------------------------------------------------
def training_steps(check):
    data = Path(os.environ.get("GPU_DATA", ROOT / ".gpu_data"))
    if not _cuda(check):
        check.log("  no CUDA device: training runs skipped (CUDA part)")
        check.facts["training"] = "skipped: no CUDA"
        return
    if not (data / "train.bin").exists():
        check.log(f"  no token data at {data} (run scripts/prepare_gpu_data.sh and carry it); skipped")
        check.facts["training"] = f"skipped: no token data at {data}"
        return
    for i, k in enumerate(("torch", "triton")):
        limit = check.section_left() / (2 - i)
        # --time-budget stops the run cleanly (final eval, samples) before the process's limit.
        argv = [PY, "-m", "train", "--preset", "tinystories", "--kernels", k, "--train-data", str(data / "train.bin")]
        argv += ["--valid-data", str(data / "valid.bin"), "--tokenizer", str(data / "tokenizer")]
        argv += ["--max-steps", "400", "--lr-decay-iters", "400", "--warmup-iters", "20", "--log-interval", "25"]
        argv += ["--eval-interval", "100", "--eval-batches", "5", "--out-dir", str(check.work / "runs")]
        argv += ["--run-name", f"ts-{k}", "--resume", "never", "--quiet", "--sample-tokens", "48", "--num-samples", "1"]
        argv += ["--time-budget", f"{max(5.0, limit - 15):.0f}"]
        # Exit 3 is the trainer's "time budget reached" (checkpoint, eval and samples written).
        yield Step(f"train {k}", [argv], max_s=limit, ok_codes=(0, 3))
        metrics = check.work / "runs" / f"ts-{k}" / "metrics.jsonl"
        if metrics.exists():
            with open(check.out / "train_metrics.jsonl", "a") as out:
                for line in metrics.read_text().splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        out.write(json.dumps({"run": f"ts-{k}", **rec}) + "\n")
                        # the latest of each (losses, speed) over the run's records
                        last = check.facts.setdefault("training_runs", {}).setdefault(k, {})
                        last.update({f: rec[f] for f in TRAIN_FIELDS if rec.get(f) is not None})


# -- 6. compiled and CUDA-graph variants, larger shapes ------------------------------------------
def compiled_steps(check):
    # Each step may take a part of what is left, so one cold compile cannot starve the rest.
    bench = lambda f, *k: [[*PYTEST, *BENCH_FLAGS, f"bench/{f}", *k]]  # noqa: E731
    cases = "tinystories:triton:1,tinystories:torch:1,tinystories:triton:reduce-overhead"
    env = {"BENCH_E2E": cases, "GPU_CHECK_SECTION": "compiled"}
    yield Step("train step compiled", bench("test_bench_e2e.py", "-k", "train_step_gpu"), env, _show,
               max_s=0.45 * check.section_left())  # fmt: skip
    env = {"BENCH_BACKENDS": "compile", "GPU_CHECK_SECTION": "compiled"}
    yield Step("kernels compiled", bench("test_bench_kernels.py"), env, _show, max_s=0.5 * check.section_left())
    env = {"BENCH_E2E": "gpt2-small:triton:0,gpt2-small:torch:0", "GPU_CHECK_SECTION": "compiled"}
    yield Step("train step gpt2-small", bench("test_bench_e2e.py", "-k", "train_step_gpu"), env, _show,
               max_s=0.4 * check.section_left())  # fmt: skip
    env = {"GPU_CHECK_SECTION": "compiled"}
    yield Step("largest batch", bench("test_bench_e2e.py", "-k", "largest_batch"), env, _show,
               max_s=0.5 * check.section_left())  # fmt: skip
    env = {"BENCH_PRESETS": "gpt2-xl", "BENCH_BACKENDS": "ours,torch,builtin", "GPU_CHECK_SECTION": "compiled"}
    yield Step("gpt2-xl kernels", bench("test_bench_kernels.py"), env, _show)


SECTIONS = [
    dict(name="device", title="device facts and measured ceilings", cap_s=25, steps=device_steps),
    dict(
        name="kernels", title="kernels at the goal shapes: ours, eager, built-in, Liger", cap_s=120, steps=kernel_steps
    ),
    dict(name="e2e", title="end to end, eager: TinyStories torch and triton", cap_s=45, steps=e2e_steps),
    dict(name="tests", title="GPU correctness tests", cap_s=75, steps=test_steps),
    dict(name="training", title="training runs (--time-budget)", cap_s=60, steps=training_steps),
    dict(name="compiled", title="compiled and CUDA-graph variants, larger shapes", cap_s=75, steps=compiled_steps),
]


# -- goals: one summary line each ---------------------------------------------------------------
def _unreached(sections, name, facts) -> tuple[str, str]:
    s = sections.get(name)
    if s is None or s.started_s is None:
        return "not reached", f"section {name} not reached"
    if s.status.startswith("cut off"):
        return "not reached", f"section {name} {s.status}"
    if s.status != "ok":
        return "failed", f"section {name}: {s.status}"
    if not facts.get("device", {}).get("has_cuda"):
        return "not reached", "no CUDA device"
    return "failed", f"no row although section {name} ended ok"


def _fmt_row(r: dict) -> str:
    if r.get("error"):
        return f"{r.get('shape', r.get('preset', ''))} {r.get('mode', '')}: {r['error'][:80]}"
    if "tflops" in r:
        val = f"{r['tflops']:.0f} TFLOP/s"
    elif "gb_s" in r:
        val = f"{r['gb_s']:.0f} GB/s"
    else:
        val = f"{r.get('ms', 0):.3f} ms"
    pct = f" ({r['pct_of_peak']:.0f}% of measured)" if r.get("pct_of_peak") else ""
    return f"{r.get('shape', '')} {r.get('mode', '')} {val}{pct}"


def _kernel_goal(op, section="kernels", backend="ours", shape=None):
    def judge(rows, sections, facts):
        mine = [
            r
            for r in rows
            if r.get("kind") == "kernel"
            and op in (None, r.get("op"))
            and r.get("backend") == backend
            and (
                shape is None or any(x in r.get("shape", "") for x in (shape if isinstance(shape, tuple) else (shape,)))
            )
        ]
        ok = [r for r in mine if not r.get("error")]
        if ok:
            base = {
                (r["op"], r["shape"], r["mode"]): r["ms"]
                for r in rows
                if r.get("kind") == "kernel" and r.get("backend") == "torch" and r.get("ms")
            }
            parts = []
            for r in ok[:4]:
                ref = base.get((r["op"], r["shape"], r["mode"]))
                what = "" if op else f"{r['op']} "
                parts.append(what + _fmt_row(r) + (f", {ref / r['ms']:.2f}x torch" if ref else ""))
            more = f" (+{len(ok) - 4} rows)" if len(ok) > 4 else ""
            bad = f"; {len(mine) - len(ok)} failed" if len(mine) > len(ok) else ""
            return "measured", "; ".join(parts) + more + bad
        if mine:
            return "failed", _fmt_row(mine[0])
        return _unreached(sections, section, facts)

    return judge


def _peak_goal(key, unit):
    def judge(rows, sections, facts):
        v = [r.get(key) for r in rows if r.get("kind") == "peaks" and r.get(key)]
        if v:
            return "measured", f"{v[-1]:.0f} {unit}"
        if (
            sections.get("device")
            and sections["device"].started_s is not None
            and not facts.get("device", {}).get("has_cuda")
        ):
            return "not reached", "no CUDA device"
        return _unreached(sections, "device", facts)

    return judge


def _e2e_goal(preset, backend, section):
    def judge(rows, sections, facts):
        mine = [r for r in rows if r.get("kind") == "e2e" and r.get("preset") == preset and r.get("backend") == backend]
        ok = [r for r in mine if not r.get("error")]
        if ok:
            r = ok[-1]
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
            mem = f", peak {r['peak_mem_gb']:.1f} GB" if r.get("peak_mem_gb") else ""
            return "measured", f"{r.get('tokens_per_s', 0):,.0f} tokens/s{mfu}{mem}"
        if mine:
            return "failed", mine[-1]["error"][:120]
        return _unreached(sections, section, facts)

    return judge


def _largest_batch(rows, sections, facts):
    mine = [r for r in rows if r.get("kind") == "largest_batch"]
    if mine:
        return "measured", ", ".join(f"{r['backend']} {r['batch_size']}" for r in mine)
    return _unreached(sections, "compiled", facts)


def _tests(rows, sections, facts):
    t = facts.get("tests")
    if not t or "passed" not in t:
        return _unreached(sections, "tests", facts)
    if t["failed"] or t["error"]:
        return "failed", f"{t['failed']} failed, {t['error']} errors, {t['passed']} passed of {t['collected']}"
    if not t["passed"]:
        return "not reached", f"{t['skipped']} skipped of {t['collected']} (no CUDA)"
    return "measured", f"{t['passed']} passed, {t['skipped']} skipped of {t['collected']}"


def _training(kernels):
    def judge(rows, sections, facts):
        if isinstance(facts.get("training"), str):
            return "not reached", facts["training"]
        last = facts.get("training_runs", {}).get(kernels)
        if last:
            keys = [k for k in TRAIN_FIELDS if k in last]
            return "measured", ", ".join(
                f"{k} {last[k]:.4g}" if isinstance(last[k], float) else f"{k} {last[k]}" for k in keys
            )
        return _unreached(sections, "training", facts)

    return judge


GOALS = [
    ("ceiling: copy bandwidth", _peak_goal("measured_copy_gbs", "GB/s")),
    ("ceiling: bf16 matmul", _peak_goal("measured_matmul_tflops", "TFLOP/s")),
    ("kernel rms_norm (% of copy bw)", _kernel_goal("rms_norm")),
    ("kernel add_rms_norm", _kernel_goal("add_rms_norm")),
    ("kernel swiglu", _kernel_goal("swiglu")),
    ("kernel swiglu_packed", _kernel_goal("swiglu_packed")),
    ("kernel rope_qk", _kernel_goal("rope_qk")),
    ("kernel cross_entropy fwd+bwd", _kernel_goal("cross_entropy")),
    ("kernel linear_cross_entropy fwd+bwd", _kernel_goal("linear_cross_entropy")),
    ("kernel attention (presets)", _kernel_goal("attention", shape=("tinystories", "gpt2-small"))),
    ("kernel attention long T4096 (TFLOP/s)", _kernel_goal("attention", shape="long")),
    ("kernel attention 16k", _kernel_goal("attention", shape="16k")),
    ("kernel attention bwd, deterministic=False", _kernel_goal("attention", backend="ours-nondet")),
    ("kernel adamw step", _kernel_goal("adamw")),
    ("e2e tokens/s tinystories torch eager", _e2e_goal("tinystories", "torch", "e2e")),
    ("e2e tokens/s tinystories triton eager", _e2e_goal("tinystories", "triton", "e2e")),
    ("GPU correctness tests", _tests),
    ("training run tinystories torch", _training("torch")),
    ("training run tinystories triton", _training("triton")),
    ("kernels vs torch.compile (all ops)", _kernel_goal(None, section="compiled", backend="compile")),
    ("e2e tinystories triton +compile", _e2e_goal("tinystories", "triton+compile", "compiled")),
    ("e2e tinystories torch +compile", _e2e_goal("tinystories", "torch+compile", "compiled")),
    ("e2e tinystories triton CUDA graphs", _e2e_goal("tinystories", "triton+compile:reduce-overhead", "compiled")),
    ("e2e gpt2-small triton eager", _e2e_goal("gpt2-small", "triton", "compiled")),
    ("largest batch tinystories", _largest_batch),
    ("kernels at gpt2-xl shapes (all ops)", _kernel_goal(None, section="compiled", shape="gpt2-xl")),
]
