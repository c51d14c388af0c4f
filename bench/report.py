"""``python -m bench.report [RESULTS ...] --out DIR``: one Markdown report with PNG plots from
benchmark results files (default: every file under bench/results/, recorded, and bench/results/local/,
local runs). Every row names its results file.

Sections: provenance, device peaks (table and measured), kernels (% of peak per backend), end to end
(tokens/s, MFU, peak memory, step-time breakdown), tokenizer ratios, training runs given with
``--runs`` (losses, tokens/s, MFU, and each run's training-loss gap to the first), and the analytic
FLOPs breakdown across model sizes and context lengths.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from bench.results import LOCAL_RESULTS_DIR, RESULTS_DIR, NotAResultsFile, load_results


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def _row(*cells) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(rows, out: Path) -> Path | None:
    rows = [r for r in rows if r.get("kind") == "kernel" and r.get("pct_of_peak") is not None]
    if not rows:
        return None
    plt = _plt()
    groups = sorted({(r["op"], r["shape"], r["mode"]) for r in rows})
    backends = sorted({r["backend"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(groups) * len(backends) / 2), 5))
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        vals = []
        for g in groups:
            m = [r["pct_of_peak"] for r in rows if (r["op"], r["shape"], r["mode"]) == g and r["backend"] == b]
            vals.append(m[0] if m else 0)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=b)
    ax.set_xticks([j + 0.4 for j in range(len(groups))])
    ax.set_xticklabels([f"{o} {m}\n{s}" for o, s, m in groups], rotation=75, fontsize=6)
    ax.set_ylabel("% of measured peak (bandwidth or bf16 matmul)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_e2e(rows, out: Path) -> Path | None:
    rows = [r for r in rows if r.get("kind") == "e2e" and r.get("tokens_per_s")]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['preset']}\n{r['backend']}" for r in rows]
    axes[0].bar(labels, [r["tokens_per_s"] for r in rows])
    axes[0].set_ylabel("tokens/s")
    comps = list(dict.fromkeys(c for r in rows for c in r.get("breakdown_ms") or {}))
    bottom = [0.0] * len(rows)
    for c in comps:
        vals = [r.get("breakdown_ms", {}).get(c, 0.0) for r in rows]
        axes[1].bar(labels, vals, bottom=bottom, label=c)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set_ylabel("ms per profiled step (parts sum to it)")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_flops(out: Path) -> Path:
    from model.flops import forward_flops_breakdown
    from train.config import preset

    plt = _plt()
    names = ["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, configs) in zip(
        axes,
        [
            ("model size (T = 1024)", [(n, 1024) for n in names]),
            ("context length (gpt2-xl)", [("gpt2-xl", t) for t in (256, 1024, 4096, 16384)]),
        ],
    ):
        labels, parts = [], defaultdict(list)
        for name, t in configs:
            cfg, _ = preset(name)
            br = forward_flops_breakdown(cfg, t, 1)
            total = sum(br.values())
            labels.append(f"{name}\nT={t}")
            for k, v in br.items():
                parts[k].append(100 * v / total)
        bottom = [0.0] * len(labels)
        for k, vals in parts.items():
            ax.bar(labels, vals, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(title)
        ax.set_ylabel("% of forward FLOPs")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# Older results files' keys for the same figures (their per-component TFLOP/s were hardware FLOPs).
_LEGACY = {"breakdown_hardware_tflops": "breakdown_tflops", "est_mem_gb": "est_peak_mem_gb"}
BREAKDOWN_ORDER = ("matmul", "attention", "norm", "rope", "swiglu", "loss", "optimizer", "unclassified", "other")


def _get(r: dict, key: str):
    return r.get(key) if r.get(key) is not None else r.get(_LEGACY.get(key, ""))


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v else "-"


def e2e_section(e2e: list[dict]) -> list[str]:
    """Markdown lines for the end-to-end rows: throughput with each figure's convention, and the
    step breakdown whose parts sum to its total (what no kernel accounts for named ``unattributed``)."""
    lines = [
        "",
        "## End to end (one training step: forward, backward, optimizer)",
        "",
        "| preset | backend | dtype | batch | ms/step | tokens/s | model TFLOP/s | MFU (table peak) "
        "| MFU (measured bf16 peak) | peak GB | estimated GB | matmul hw TFLOP/s | attention hw TFLOP/s "
        "| GPU busy | note | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in e2e:
        bt = _get(r, "breakdown_hardware_tflops") or {}
        busy = _fmt(r.get("device_busy_pct"), 0) + "%" if r.get("device_busy_pct") else "-"
        lines.append(
            _row(
                r["preset"],
                r["backend"],
                r.get("dtype", "-"),
                r.get("batch_size", "-"),
                _fmt(r.get("ms")),
                _fmt(r.get("tokens_per_s"), 0),
                _fmt(r.get("model_tflops"), 3),
                _pct(r.get("mfu")),
                _pct(r.get("mfu_measured_peak")),
                _fmt(r.get("peak_mem_gb")),
                _fmt(_get(r, "est_mem_gb")),
                _fmt(bt.get("matmul"), 1),
                _fmt(bt.get("attention"), 1),
                busy,
                r.get("error", ""),
                r.get("file", "-"),
            )
        )
    peaks = sorted({r["mfu_peak"] for r in e2e if r.get("mfu_peak")})
    lines += [
        "",
        "Conventions: model TFLOP/s and MFU count model FLOPs (matmuls, attention dense even when causal, "
        "training = 3x forward, no recompute); MFU divides them by the dense peak of the dtype the step "
        "computes in (" + ("; ".join(peaks) if peaks else "no table peak for these devices") + "), and the "
        "measured-peak MFU by a bf16 matmul timed in the same session (bf16 steps only). The per-component "
        '"hw" figures are hardware FLOPs (what the backend executes: triton attention causal half with '
        "its backward recomputing the scores, torch attention dense, its matmuls counted under matmul) over "
        "that component's profiled time. Estimated GB: fp32 params, grads and AdamW state plus the "
        "activations saved for the backward (no transients). GPU busy: kernel time over step time; well under "
        "100% means the step waits on the host (launch overhead), not on the GPU.",
    ]
    return lines + breakdown_section(e2e)


def breakdown_section(e2e: list[dict]) -> list[str]:
    """The step breakdown table: parts that sum to the profiled total, what no kernel covers named."""
    lines: list[str] = []
    comps = [c for c in BREAKDOWN_ORDER if any(c in (r.get("breakdown_ms") or {}) for r in e2e)]
    if comps:
        lines += [
            "",
            "Step time by component (ms per step, from the profiler: kernels on a GPU, aten ops' self time "
            "on the CPU). The parts sum to the total, the profiled steps' wall time (profiler overhead "
            "included, so above ms/step): unclassified = kernels whose names match no component, "
            "unattributed = time in no kernel (host work, launch gaps). Rows from older files have no total.",
            "",
            _row("preset", "backend", *comps, "unattributed", "total", "file"),
            "|" + "---|" * (len(comps) + 5),
        ]
        for r in e2e:
            b = r.get("breakdown_ms") or {}
            if not b:
                continue
            total = r.get("breakdown_total_ms")
            lines.append(
                _row(
                    r["preset"],
                    r["backend"],
                    *(_fmt(b.get(c)) for c in comps),
                    _fmt(b.get("unattributed")),
                    _fmt(total),
                    r.get("file", "-"),
                )
            )
    return lines


def training_runs_section(run_dirs: list[str | Path]) -> list[str]:
    """Markdown lines for training runs (``python -m train`` directories): each run's losses,
    tokens/s and MFU, and how far each run's training loss strays from the first run's at the
    steps both logged (the backends' agreement, when the runs differ only in --kernels)."""
    from train.sweep import run_summary, runs_table

    runs = [run_summary(d) for d in run_dirs]
    lines = ["", "## Training runs", "", runs_table(runs), ""]
    first = runs[0]
    for r in runs[1:]:
        common = sorted(set(first["train_curve"]) & set(r["train_curve"]))
        if not common:
            continue
        diffs = [abs(r["train_curve"][s] - first["train_curve"][s]) for s in common]
        worst = max(range(len(common)), key=diffs.__getitem__)
        lines.append(
            f"- {r['run']} vs {first['run']}: training loss differs by at most {diffs[worst]:.4f} "
            f"(step {common[worst]}) over {len(common)} logged steps; mean {sum(diffs) / len(diffs):.4f}"
        )
    return lines


def provenance_section(rows: list[dict]) -> list[str]:
    metas = sorted(
        {
            (r.get("device"), r.get("torch"), r.get("triton"), (r.get("git_commit") or "")[:10], r.get("date"),
             r.get("file"))
            for r in rows
        }
    )  # fmt: skip
    lines = ["## Provenance", "", "| device | torch | triton | commit | date | file |", "|---|---|---|---|---|---|"]
    return lines + [_row(*m) for m in metas]


def peaks_section(peaks: list[dict]) -> list[str]:
    lines = [
        "",
        "## Device peaks",
        "",
        "| device | table bf16 TFLOP/s | table GB/s | measured matmul TFLOP/s | measured copy GB/s | source |",
        "|---|---|---|---|---|---|",
    ]
    for p in peaks:
        t = p.get("table") or {}
        lines.append(
            _row(
                p["device"],
                _fmt(t.get("bf16_tflops")),
                _fmt(t.get("bandwidth_gbs")),
                _fmt(p.get("measured_matmul_tflops")),
                _fmt(p.get("measured_copy_gbs")),
                t.get("source", "-"),
            )
        )
    return lines


def kernels_section(kern: list[dict]) -> list[str]:
    lines = [
        "",
        "## Kernels",
        "",
        "| op | shape | mode | backend | ms | GB/s | TFLOP/s | % of peak | peak MB | vs torch | note | file |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["op"], r["shape"], r["mode"], r["device"]): r.get("ms") for r in kern if r["backend"] == "torch"}
    for r in kern:
        ref = base.get((r["op"], r["shape"], r["mode"], r["device"]))
        speedup = ref / r["ms"] if ref and r.get("ms") else None
        note = r.get("error") or ", ".join(f"{k} {v}" for k, v in (r.get("autotuned") or {}).items())
        lines.append(
            _row(
                r["op"],
                r["shape"],
                r["mode"],
                r["backend"],
                _fmt(r.get("ms"), 3),
                _fmt(r.get("gb_s"), 0),
                _fmt(r.get("tflops"), 1),
                _fmt(r.get("pct_of_peak"), 1),
                _fmt(r.get("peak_mem_mb"), 0),
                f"{_fmt(speedup)}x",
                note,
                r.get("file", "-"),
            )
        )
    return lines


def other_sections(rows: list[dict]) -> list[str]:
    """Largest batch that fits, and the tokenizer rows."""
    lines: list[str] = []
    lb = [r for r in rows if r.get("kind") == "largest_batch"]
    if lb:
        lines += ["", "## Largest batch that fits", "", "| preset | backend | batch | file |", "|---|---|---|---|"]
        lines += [_row(r["preset"], r["backend"], r["batch_size"], r.get("file", "-")) for r in lb]
    tok = [r for r in rows if r.get("kind", "").startswith("tokenizer")]
    if tok:
        lines += ["", "## Tokenizer", ""]
        for r in tok:
            fields = (f"{k}={_fmt(v)}" for k, v in r.items() if k not in ("file", "meta") and not isinstance(v, dict))
            lines.append("- " + ", ".join(fields) + f" (file {r.get('file', '-')})")
    return lines


def build_report(paths: list[str | Path], out_dir: str | Path, runs: list[str | Path] | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = load_results(paths)
    by_kind = lambda kind: [r for r in rows if r.get("kind") == kind]
    lines = ["# Benchmark report", "", *provenance_section(rows)]
    if by_kind("peaks"):
        lines += peaks_section(by_kind("peaks"))
    if by_kind("kernel"):
        lines += kernels_section(by_kind("kernel"))
        if plot_kernels(by_kind("kernel"), out_dir / "kernels.png"):
            lines += ["", "![kernels](kernels.png)"]
    if by_kind("e2e"):
        lines += e2e_section(by_kind("e2e"))
        if plot_e2e(by_kind("e2e"), out_dir / "e2e.png"):
            lines += ["", "![end to end](e2e.png)"]
    lines += other_sections(rows)
    if runs:
        lines += training_runs_section(runs)
    plot_flops(out_dir / "flops.png")
    lines += ["", "## FLOPs breakdown (analytic, `python -m bench.flops`)", "", "![flops](flops.png)", ""]
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    p.add_argument("results", nargs="*", help="results files or directories (default: bench/results)")
    p.add_argument("--out", default="bench/report", help="output directory for REPORT.md and the PNGs")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="training run directories (python -m train) to summarise and compare, first one the baseline",
    )
    args = p.parse_args(argv)
    paths = args.results or [d for d in (RESULTS_DIR, LOCAL_RESULTS_DIR) if d.exists()] or [RESULTS_DIR]
    if not any(Path(x).exists() for x in paths):
        print(
            f"error: no results found at {', '.join(map(str, paths))}; run: pytest bench --benchmark-only",
            file=sys.stderr,
        )
        return 1
    missing = [r for r in args.runs or [] if not (Path(r) / "metrics.jsonl").exists()]
    if missing:
        print(f"note: no metrics.jsonl in {', '.join(missing)}; those runs are left out", file=sys.stderr)
    runs = [r for r in args.runs or [] if r not in missing]
    try:
        print(build_report(paths, args.out, runs))
    except NotAResultsFile as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
