"""``python3 -m bench.ingest OUT``: a GPU check's fetched output into the repository's results.

Copies ``OUT/results/*.json`` (rows with device, versions, commit, date) into ``bench/results/``,
with the check's summary (timeline, one line per goal) beside them as ``<name>.summary.json``, and
fills ``bench/NOTES.md``: the "measured" column of the kernel table (each row's time, its share of
the measured ceiling, the gap to the floor that ceiling implies and its ratio to torch eager in
the same run) and a generated section with every goal's line and the end-to-end rows. Running it
again with the same OUT gives the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.results import RESULTS_DIR

NOTES = Path(__file__).resolve().parent / "NOTES.md"
BEGIN = "<!-- gpu-check results: written by python3 -m bench.ingest; edits here are overwritten -->"
END = "<!-- end of gpu-check results -->"
KERNEL_TABLE = "## Kernels: work and the time it implies"

# The kernel table's rows (first cell) -> the benchmark case they predict (op, shape). "same":
# the row above's case.
NOTES_CASES = {
    "RMSNorm 16384 x 512 (TinyStories)": ("rms_norm", "tinystories 16384x512"),
    "RMSNorm 16384 x 512": ("rms_norm", "tinystories 16384x512"),
    "RMSNorm 8192 x 4096": ("rms_norm", "gpt2-small 8192x4096"),
    "SwiGLU 16384 x 1344": ("swiglu", "tinystories 16384x1344"),
    "RoPE q+k, 16384 tokens x 16 heads x 32": ("rope_qk", "tinystories B64 T256 H16 D32"),
    "cross-entropy 16384 x 10000": ("cross_entropy", "tinystories 16384x10000"),
    "attention B4 H16 T4096 D128 causal": ("attention", "long B4 H16 T4096 D128 causal"),
    "attention TinyStories B64 H16 T256 D32": ("attention", "tinystories B64 H16 T256 D32 causal"),
    "linear CE N16384 d768 V50257": ("linear_cross_entropy", "N16384 d768 V50257"),
}


def measured_cell(row: dict, torch_ms: float | None, commit: str) -> str:
    """'24.1 us, 81% of measured copy bw (1.23x its floor), 2.10x torch; abc1234'."""
    if row.get("error"):
        return f"failed: {row['error'][:80]} ({commit})"
    ms = row["ms"]
    t = f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"
    if "tflops" in row:
        val = f"{row['tflops']:.0f} TFLOP/s"
        ceiling = "measured bf16 matmul"
    else:
        val = f"{row['gb_s']:.0f} GB/s"
        ceiling = "measured copy bw"
    parts = [f"{t}, {val}"]
    if row.get("pct_of_peak"):
        parts.append(f"{row['pct_of_peak']:.0f}% of {ceiling} ({100 / row['pct_of_peak']:.2f}x its floor)")
    if torch_ms:
        parts.append(f"{torch_ms / ms:.2f}x torch")
    return ", ".join(parts) + f"; {commit}"


def fill_kernel_table(text: str, rows: list[dict], commit: str) -> tuple[str, int]:
    """The kernel table's "measured" cells from our backend's rows; returns (text, cells filled)."""
    lines = text.split("\n")
    try:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(KERNEL_TABLE))
    except StopIteration:
        return text, 0
    kernel = {(r["op"], r["shape"], r["mode"], r["backend"]): r for r in rows if r.get("kind") == "kernel"}
    header = col = None
    filled, last_case = 0, None
    for i in range(start + 1, len(lines)):
        ln = lines[i]
        if ln.startswith("## "):
            break
        if not ln.startswith("|"):
            continue
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if header is None:
            header = cells
            col = header.index("measured") if "measured" in header else None
            continue
        if col is None or set(ln) <= set("|-: "):
            continue
        name, mode = cells[0], cells[1]
        case = last_case if name.startswith("attention same") else NOTES_CASES.get(name)
        last_case = case
        if case is None or len(cells) <= col:
            continue
        ours = kernel.get((*case, mode, "ours"))
        if ours is None:
            continue
        torch_row = kernel.get((*case, mode, "torch"))
        cells[col] = measured_cell(
            ours, torch_row.get("ms") if torch_row and not torch_row.get("error") else None, commit
        )
        lines[i] = "| " + " | ".join(cells) + " |"
        filled += 1
    return "\n".join(lines), filled


def generated_section(meta: dict, summary: dict | None, rows: list[dict], source: str) -> str:
    out = [BEGIN, "## GPU check: measured", ""]
    out.append(
        f"{meta.get('device')}, torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
        f"commit {str(meta.get('git_commit'))[:8]}, {meta.get('date')}; rows in `bench/results/{source}`."
    )
    peaks = [r for r in rows if r.get("kind") == "peaks"]
    if peaks:
        p = peaks[-1]
        out += [
            "",
            f"Measured ceilings: copy {p.get('measured_copy_gbs', 0):.0f} GB/s (read + write), "
            f"bf16 matmul {p.get('measured_matmul_tflops', 0):.0f} TFLOP/s (8192^3, random data).",
        ]
    if summary:
        out += ["", "| goal | status | measured |", "|---|---|---|"]
        out += [f"| {g['goal']} | {g['status']} | {g['detail'].replace('|', '/')} |" for g in summary.get("goals", [])]
        tl = ", ".join(
            f"{s['section']} {s['seconds']:.0f}/{s['limit_s']:.0f} s {s['status']}" for s in summary.get("timeline", [])
        )
        out += ["", f"Timeline (section, seconds used / limit, status), budget {summary.get('budget_s')} s: {tl}."]
    e2e = [r for r in rows if r.get("kind") == "e2e"]
    if e2e:
        out += [
            "",
            "| preset | backend | batch | tokens/s | MFU (datasheet) | peak memory GB |",
            "|---|---|---|---|---|---|",
        ]
        for r in e2e:
            if r.get("error"):
                out.append(f"| {r['preset']} | {r['backend']} | - | failed: {r['error'][:60]} | - | - |")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
            tok_s = f"{r.get('tokens_per_s', 0):,.0f}"
            out.append(f"| {r['preset']} | {r['backend']} | {r.get('batch_size', '-')} | {tok_s} | {mfu} | {mem} |")
    out += ["", END]
    return "\n".join(out)


def update_notes(text: str, section: str) -> str:
    if BEGIN in text and END in text:
        a, b = text.index(BEGIN), text.index(END) + len(END)
        return text[:a] + section + text[b:]
    at = text.find(KERNEL_TABLE)
    at = len(text) if at < 0 else at
    return text[:at] + section + "\n\n" + text[at:]


def ingest(out: Path, results_dir: Path = RESULTS_DIR, notes: Path = NOTES, commit: str | None = None) -> list[str]:
    files = sorted((out / "results").glob("*.json"))
    if not files:
        raise SystemExit(f"bench.ingest: no results file under {out / 'results'} (is {out} a GPU check's output?)")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
    results_dir.mkdir(parents=True, exist_ok=True)
    done = []
    text = notes.read_text()
    for f in files:
        data = json.loads(f.read_text())
        meta, rows = data.get("meta", {}), data.get("rows", [])
        if not meta.get("device"):
            raise SystemExit(f"bench.ingest: {f} has no device in its meta; not a results file")
        if not meta.get("git_commit"):
            if not commit:
                raise SystemExit(
                    f"bench.ingest: {f} records no commit (run the check with GPU_CHECK_COMMIT=<hash>, "
                    "or pass --commit HASH: the commit the device ran)"
                )
            meta.update(git_commit=commit, git_commit_source="bench.ingest --commit")
        (results_dir / f.name).write_text(json.dumps({**data, "meta": meta}, indent=1, default=str))
        done.append(f"copied {f.name} ({len(rows)} rows) to {results_dir}")
        if summary is not None:
            (results_dir / f"{f.stem}.summary.json").write_text(json.dumps(summary, indent=1))
            done.append(f"wrote {f.stem}.summary.json")
        if meta.get("device_type") != "cuda":
            done.append(f"{f.name}: not a GPU run ({meta.get('device')}); NOTES left as they are")
            continue
        text, n = fill_kernel_table(text, rows, str(meta["git_commit"])[:7])
        text = update_notes(text, generated_section(meta, summary, rows, f.name))
        done.append(f"NOTES: {n} measured cells filled, the GPU check section written")
    notes.write_text(text)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="the GPU check's output directory, as fetched (holds results/ and summary.json)")
    p.add_argument("--results-dir", default=str(RESULTS_DIR), help="where the results files go (default bench/results)")
    p.add_argument("--notes", default=str(NOTES), help="the notes file to fill (default bench/NOTES.md)")
    p.add_argument("--commit", help="the commit the device ran, where its results record none")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        p.error(f"{out}: not a directory")
    for line in ingest(out, Path(args.results_dir), Path(args.notes), args.commit):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
