"""The GPU check's runner: ``bash bench/gpu_check.sh OUT`` calls ``python3 -m bench.gpu_check OUT``.

One hard total budget (``GPU_CHECK_BUDGET`` seconds, default 420) that this process enforces: the
sections run in order of value, each limited to its share of what is left (its cap over the caps of
it and the sections after it), so a hung section costs only its share and the later ones still
run; the last seconds are kept for the report and the archive. Every measuring process writes its
output through a pipe this process reads line by line into ``logs.txt`` (flushed per line), and a
process that outruns its limit is killed with its process group, never a pipeline: what it printed
and the rows it flushed (``bench.results`` rewrites its file per row) stay. A failing step or
section is recorded and the next one runs. At the end, one summary line per goal: measured, failed
(with the reason) or not reached.

What comes back under OUT (at most ``MAX_FILES`` files, no ``.tmp``): ``logs.txt`` (timeline, every
section's lines, the summary), ``summary.json`` (the same, for ``python3 -m bench.ingest``),
``results/<one file>.json`` (benchmark rows with device, versions, commit), ``train_metrics.jsonl``,
``REPORT.md`` and ``read_later.tar.gz`` (full test and warm-up logs, the report's plots, the training
runs' samples and metrics).

For tests on a CPU: the CUDA parts are skipped as on any CPU, and ``GPU_CHECK_INJECT=section:hang``
or ``section:error`` (comma-separated) makes that section's first process flush a row and a log
line, then hang or raise (see ``inject_here``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 420.0
MAX_FILES = 6  # the device tool returns 8; two spare
PY = sys.executable or "python3"


@dataclass
class Step:
    """One process, or several run side by side (``argvs``), under the section's limit."""

    label: str
    argvs: list[list[str]]
    env: dict = field(default_factory=dict)
    show: Callable[[str], bool] | None = None  # which lines go to logs.txt (all go to the full log)
    max_s: float | None = None  # a tighter limit than the section's
    optional: bool = False  # a failure is logged but leaves the section's status alone
    ok_codes: tuple[int, ...] = (0,)  # exit codes that mean success (train: 3 is "time budget reached")


@dataclass
class StepResult:
    rcs: list[int | None]  # None: killed at its limit
    seconds: float
    lines: list[str]
    logs: list[Path]
    own_limit: bool = False  # the step's own max_s, not the section's limit, was what it ran under
    ok_codes: tuple[int, ...] = (0,)

    @property
    def timed_out(self) -> bool:
        return any(rc is None for rc in self.rcs)

    @property
    def ok(self) -> bool:
        return all(rc in self.ok_codes for rc in self.rcs)


@dataclass
class Section:
    name: str
    title: str
    cap_s: float  # its share at the default budget; scaled to what is left
    steps: Callable[[Check], Iterator[Step]]
    status: str = "not reached"
    started_s: float | None = None
    seconds: float = 0.0
    limit_s: float = 0.0


class Check:
    def __init__(self, out: Path, budget_s: float, inject: dict[str, str] | None = None):
        self.t0 = time.monotonic()
        self.out = out
        self.budget_s = budget_s
        # The report, the archive and the summary need a few seconds whatever happened before.
        self.reserve_s = min(20.0, max(6.0, 0.08 * budget_s))
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        (self.work / "full").mkdir()
        self.inject = inject or {}
        self.facts: dict = {}
        self.sections: list[Section] = []
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results").mkdir(exist_ok=True)
        self._log = open(self.out / "logs.txt", "a", buffering=1)
        self._lock = threading.Lock()
        self.env = self._base_env()
        self.last: StepResult | None = None
        self._live: set = set()  # processes running now (killed if this runner is interrupted)
        self.section_deadline = 0.0

    def section_left(self) -> float:
        return self.section_deadline - time.monotonic()

    def _base_env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["BENCH_RESULTS_DIR"] = str(self.out / "results")
        env["BENCH_RESULTS_APPEND"] = "1"  # every session continues the one results file
        env["BENCH_QUICK"] = "1"
        env["BENCH_PEAKS_FILE"] = str(self.work / "peaks.json")
        env.setdefault("BENCH_PRESETS", "tinystories,gpt2-small")
        env.pop("GPU_CHECK_INJECT", None)
        return env

    # -- time -------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left_for_sections(self) -> float:
        return self.budget_s - self.reserve_s - self.elapsed()

    # -- output -----------------------------------------------------------------------------
    def kill_all(self) -> None:
        for p in list(self._live):
            _kill_group(p)
        self._live.clear()

    def log(self, line: str = "") -> None:
        with self._lock:
            self._log.write(line + "\n")
            print(line, flush=True)

    # -- processes --------------------------------------------------------------------------
    def run(self, step: Step, limit_s: float, section: str) -> StepResult:
        """Run a step's processes until they end or ``limit_s`` passes (then their process groups
        are killed). One process: its lines stream into logs.txt as printed. Several: each writes
        its own log file, read after."""
        t = time.monotonic()
        own_limit = step.max_s is not None and step.max_s < limit_s
        if own_limit:
            limit_s = step.max_s
        deadline = t + max(0.0, limit_s)
        env = {**self.env, **step.env}
        single = len(step.argvs) == 1
        procs, logs, threads, lines = [], [], [], []
        for i, argv in enumerate(step.argvs):
            path = self.work / "full" / f"{section}_{_slug(step.label)}{'' if single else f'_{i}'}.log"
            logs.append(path)
            fh = open(path, "w", buffering=1)
            stdout = subprocess.PIPE if single else fh
            try:
                p = subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=env,
                    stdout=stdout,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,  # its own process group: killed whole at the limit
                    text=True,
                    errors="replace",
                )
            except OSError as e:
                fh.write(f"could not start {argv[0]}: {e}\n")
                fh.close()
                procs.append(None)
                continue
            procs.append(p)
            self._live.add(p)
            if single:
                th = threading.Thread(target=self._pump, args=(p, fh, step.show, lines), daemon=True)
                th.start()
                threads.append(th)
            else:
                fh.close()
        rcs: list[int | None] = []
        for p in procs:
            if p is None:
                rcs.append(127)
                continue
            try:
                rcs.append(p.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                rcs.append(None)
        for p, rc in zip(procs, rcs):
            if p is not None and rc is None:
                _kill_group(p)
            self._live.discard(p)
        for th in threads:
            th.join(timeout=3)
        return StepResult(rcs, time.monotonic() - t, lines, logs, own_limit, step.ok_codes)

    def _pump(self, proc, fh, show, lines) -> None:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            fh.write(line + "\n")
            lines.append(line)
            if show is None or show(line):
                self.log("  " + line)
        fh.close()

    # -- sections ---------------------------------------------------------------------------
    def run_sections(self, sections: list[Section]) -> None:
        self.sections = sections
        for i, sec in enumerate(sections):
            left = self.left_for_sections()
            share = sec.cap_s / sum(s.cap_s for s in sections[i:])
            sec.limit_s = left * share
            if sec.limit_s < 2.0:
                self.log(f"=== [{self.elapsed():5.0f} s] {sec.title}: not reached (budget spent) ===")
                continue
            self.log("")
            self.log(f"=== [{self.elapsed():5.0f} s] {sec.title} (limit {sec.limit_s:.0f} s) ===")
            sec.started_s = self.elapsed()
            sec.status = "ok"
            self.section_deadline = time.monotonic() + sec.limit_s
            deadline = time.monotonic() + sec.limit_s
            gen = iter(sec.steps(self))
            try:
                for step in gen:
                    left_s = deadline - time.monotonic()
                    if left_s < 1.0:
                        sec.status = f"cut off at its limit before '{step.label}'"
                        break
                    if sec.name in self.inject:
                        step.env = {**step.env, "GPU_CHECK_INJECT_HERE": self.inject.pop(sec.name)}
                    res = self.run(step, left_s, sec.name)
                    self.last = res  # what the section's next steps read (collected test ids, say)
                    if res.timed_out and res.own_limit:
                        self.log(
                            f"  !! '{step.label}' stopped at its own limit ({step.max_s:.0f} s); the section goes on"
                        )
                        continue
                    if res.timed_out:
                        running = [ln for ln in res.lines if ln.strip()][-1:] or ["(no output)"]
                        self.log(f"  !! '{step.label}' cut off at the section's limit; last line: {running[0][:160]}")
                        sec.status = f"cut off at its limit during '{step.label}'"
                        break
                    if not res.ok:
                        self.log(f"  !! '{step.label}' exited {res.rcs}; the section goes on")
                        if sec.status == "ok" and not step.optional:
                            sec.status = f"'{step.label}' failed (exit {res.rcs})"
            except Exception as e:  # a bug in a section's own bookkeeping: recorded, the check goes on
                sec.status = f"failed: {type(e).__name__}: {e}"
                self.log(f"  !! section error: {type(e).__name__}: {e}")
            finally:
                if hasattr(gen, "close"):
                    gen.close()
            sec.seconds = self.elapsed() - sec.started_s
            self.log(f"--- [{self.elapsed():5.0f} s] {sec.name}: {sec.status} ({sec.seconds:.0f} s)")

    # -- the end ----------------------------------------------------------------------------
    def finish(self, goals: list[tuple[str, Callable]]) -> dict:
        """Report, archive, summary; then leave at most MAX_FILES files and no .tmp under OUT."""
        left = self.budget_s - self.elapsed() - 2
        report_dir = self.work / "report"
        if left > 3 and list((self.out / "results").glob("*.json")):
            runs = [str(p) for p in sorted((self.work / "runs").glob("*")) if p.is_dir()]
            argv = [PY, "-m", "bench.report", str(self.out / "results"), "--out", str(report_dir)]
            if runs:
                argv += ["--runs", *runs]
            self.log(f"=== [{self.elapsed():5.0f} s] report ===")
            self.run(Step("report", [argv], show=lambda ln: "Traceback" in ln or "Error" in ln), left - 2, "report")
            if (report_dir / "REPORT.md").exists():
                shutil.copyfile(report_dir / "REPORT.md", self.out / "REPORT.md")
        rows = _load_rows(self.out / "results")
        summary = {
            "budget_s": self.budget_s,
            "facts": self.facts,
            "timeline": [
                {
                    "section": s.name,
                    "start_s": s.started_s,
                    "seconds": round(s.seconds, 1),
                    "limit_s": round(s.limit_s, 1),
                    "status": s.status,
                }
                for s in self.sections
            ],
            "goals": [],
        }
        self.log("")
        self.log(f"=== [{self.elapsed():5.0f} s] timeline ===")
        for s in self.sections:
            start = "-" if s.started_s is None else f"{s.started_s:.0f} s"
            self.log(f"  {s.name:<12} start {start:>6}  took {s.seconds:5.0f} s of {s.limit_s:4.0f} s  {s.status}")
        self.log("=== summary: one line per goal ===")
        by_name = {s.name: s for s in self.sections}
        for name, judge in goals:
            status, text = judge(rows, by_name, self.facts)
            summary["goals"].append({"goal": name, "status": status, "detail": text})
            self.log(f"  {name:<44} {status}: {text}")
        self.log(f"=== [{self.elapsed():5.0f} s] done (budget {self.budget_s:.0f} s) ===")
        (self.work / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        shutil.copyfile(self.work / "summary.json", self.out / "summary.json")
        self._stamp_commit()
        self._tidy()
        self._archive(report_dir)
        self._log.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return summary

    def _stamp_commit(self) -> None:
        """The device box gets a copy of the working tree without .git, so the results record no
        commit: take it from GPU_CHECK_COMMIT (the command line names it) or the one
        scripts/prepare_gpu_data.sh wrote beside the data, saying which."""
        commit, source = os.environ.get("GPU_CHECK_COMMIT"), "GPU_CHECK_COMMIT"
        carried = Path(os.environ.get("GPU_DATA", ROOT / ".gpu_data")) / "commit.txt"
        if not commit and carried.exists():
            commit, source = carried.read_text().strip(), "prepare_gpu_data.sh"
        if not commit:
            return
        for f in (self.out / "results").glob("*.json"):
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if data.get("meta", {}).get("git_commit"):
                continue
            data.setdefault("meta", {}).update(git_commit=commit, git_commit_source=source)
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1, default=str))
            os.replace(tmp, f)
            self.log(f"{f.name}: commit {commit[:12]} from {source} (no .git on this machine)")

    def _archive(self, report_dir: Path) -> None:
        path = self.work / "read_later.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(self.work / "full", arcname="logs")
            if report_dir.exists():
                for f in report_dir.iterdir():
                    if f.suffix != ".md":
                        tar.add(f, arcname=f"report/{f.name}")
            for run in sorted((self.work / "runs").glob("*")):
                for f in ("samples.txt", "metrics.jsonl", "config.json"):
                    if (run / f).exists():
                        tar.add(run / f, arcname=f"runs/{run.name}/{f}")
        shutil.copyfile(path, self.out / "read_later.tar.gz")

    def _tidy(self) -> None:
        """No temporary files; past MAX_FILES - 1 (the archive is the last), the least needed files
        (extra results files first) move into the archive, with a note in logs.txt."""
        for f in self.out.rglob("*.tmp"):
            f.unlink(missing_ok=True)
        order = ["logs.txt", "summary.json", "results", "train_metrics.jsonl", "REPORT.md"]
        files = [p for p in self.out.rglob("*") if p.is_file() and p.name != "read_later.tar.gz"]

        def rank(p: Path) -> tuple:
            parts = p.relative_to(self.out).parts
            return next((i for i, k in enumerate(order) if k == parts[0]), 99), p.name

        files.sort(key=rank)
        seen_results = False
        keep, extra = [], []
        for p in files:
            first_results = p.parent.name == "results" and not seen_results
            seen_results = seen_results or p.parent.name == "results"
            (keep if (p.parent.name != "results" or first_results) and len(keep) < MAX_FILES - 1 else extra).append(p)
        overflow = self.work / "full" / "overflow"
        for p in extra:
            overflow.mkdir(exist_ok=True)
            shutil.move(str(p), overflow / p.name)
            self.log(f"moved {p.relative_to(self.out)} into read_later.tar.gz (over the {MAX_FILES}-file limit)")


def _kill_group(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")[:40]


def _load_rows(results_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(results_dir.glob("*.json")):
        try:
            rows.extend(json.loads(f.read_text()).get("rows", []))
        except (OSError, ValueError):
            continue
    return rows


# -- injection (tests) ----------------------------------------------------------------------
def inject_here(where: str, write_row: Callable[[dict], None], say: Callable[[str], None]) -> None:
    """If the runner asked this process to fail (``GPU_CHECK_INJECT_HERE``): flush a row and a log
    line first (what a real section would have measured before it broke), then hang or raise."""
    what = os.environ.get("GPU_CHECK_INJECT_HERE")
    if not what:
        return
    write_row({"kind": "injected", "where": where, "what": what})
    say(f"injected {what} in {where}: this line and its row were written before it")
    if what == "hang":
        time.sleep(3600)
    raise RuntimeError(f"injected error in {where}")


def parse_inject(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        sec, _, what = item.partition(":")
        if what not in ("hang", "error"):
            raise SystemExit(f"GPU_CHECK_INJECT: '{item}' is not section:hang or section:error")
        out[sec] = what
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        from bench.gpu_check_sections import device_facts

        return device_facts(Path(argv[1]))
    if len(argv) > 1 or argv[:1] in (["-h"], ["--help"]):
        print("usage: python3 -m bench.gpu_check [OUT_DIR]   (GPU_CHECK_BUDGET=SECONDS, default 420)")
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    out = Path(argv[0] if argv else os.environ.get("OUT") or "bench/gpu_out").resolve()
    raw = os.environ.get("GPU_CHECK_BUDGET", str(DEFAULT_BUDGET_S))
    try:
        budget = float(raw)
        assert budget > 0
    except (ValueError, AssertionError):
        print(f"GPU_CHECK_BUDGET: expected a positive number of seconds, got '{raw}'", file=sys.stderr)
        return 2
    from bench.gpu_check_sections import GOALS, SECTIONS

    check = Check(out, budget, parse_inject(os.environ.get("GPU_CHECK_INJECT", "")))
    # The caller's own timeout (the device tool's) may end us: still leave the summary and no .tmp.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        check.run_sections([Section(**s) for s in SECTIONS])
    except KeyboardInterrupt:
        check.kill_all()  # they run in their own sessions: nothing else would end them
        check.log("!! interrupted: writing the summary with what was measured")
    check.finish(GOALS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
