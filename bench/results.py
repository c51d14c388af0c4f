"""Benchmark results with provenance: every row carries device, versions, commit and date.

Rows are collected during a session and written as one JSON file, ``{"meta": {...}, "rows": [...]}``:
under ``bench/results/local/`` (ignored by git) by default, under ``bench/results/`` (the recorded
results, committed) when asked to record (``pytest bench --benchmark-only --bench-record`` or
``BENCH_RECORD=1``), or under ``$BENCH_RESULTS_DIR`` when set. ``python -m bench.report`` reads
them and names each row's file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from train.provenance import provenance

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOCAL_RESULTS_DIR = RESULTS_DIR / "local"
_ROOT = RESULTS_DIR.parent.parent


def default_results_dir(record: bool | None = None) -> Path:
    """Where a session writes: $BENCH_RESULTS_DIR, else bench/results/ when recording (``record``
    or BENCH_RECORD=1), else bench/results/local/, which git ignores."""
    if os.environ.get("BENCH_RESULTS_DIR"):
        return Path(os.environ["BENCH_RESULTS_DIR"])
    if record or os.environ.get("BENCH_RECORD") == "1":
        return RESULTS_DIR
    return LOCAL_RESULTS_DIR


def results_file_name(path: Path) -> str:
    """A results file as the report names it: relative to the repository when inside it."""
    try:
        return path.resolve().relative_to(_ROOT).as_posix()
    except ValueError:
        return str(path)


class ResultsWriter:
    def __init__(self, device: torch.device | str, out_dir: str | Path | None = None, record: bool | None = None):
        self.meta = provenance(device)
        self.rows: list[dict] = []
        self.out_dir = Path(out_dir) if out_dir else default_results_dir(record)
        if os.environ.get("BENCH_RESULTS_APPEND") == "1":
            self._continue_latest()

    def _continue_latest(self) -> None:
        """Continue the newest results file of this device and commit in out_dir, if any: several
        benchmark sessions (the GPU check runs four) then leave one file, not one each."""
        for f in sorted(self.out_dir.glob("*.json"), reverse=True):
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            meta = data.get("meta", {})
            if meta.get("device") == self.meta["device"] and meta.get("git_commit") == self.meta["git_commit"]:
                self.meta, self.rows = meta, list(data.get("rows", []))
                return

    def add(self, **row) -> dict:
        """Record a row; the file is rewritten each time, so a run cut short keeps what it measured."""
        row = {**row, "device": self.meta["device"]}
        self.rows.append(row)
        self.write()
        return row

    @property
    def path(self) -> Path:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", self.meta["device"]).strip("-").lower()
        stamp = self.meta["date"].replace("+00:00", "Z").replace(":", "")
        return self.out_dir / f"{stamp}_{slug}_{(self.meta['git_commit'] or 'nogit')[:8]}.json"

    def write(self) -> Path | None:
        if not self.rows:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))
        os.replace(tmp, self.path)
        return self.path


class NotAResultsFile(ValueError):
    """A file given as results that is not one (empty, not JSON, no rows)."""


def load_results(paths: list[str | Path]) -> list[dict]:
    """All rows of the given result files (or directories of them), each with its file's meta."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(sorted(p.glob("*.json")) if p.is_dir() else [p])
    rows = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise NotAResultsFile(f"{f} is not a results file (not JSON: {e})") from None
        if not isinstance(data, dict):
            raise NotAResultsFile(f"{f} is not a results file (no rows)")
        for r in data.get("rows", []):
            rows.append({**data.get("meta", {}), **r, "file": results_file_name(f)})
    return rows
