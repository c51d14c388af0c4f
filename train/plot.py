"""``python -m train.plot RUN [RUN ...] --out curves.png``: learning curves of several runs, against
steps and against wall-clock time, in one PNG."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl, one per log interval (the one reader of that file)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[str], out: str | Path) -> Path:
    """Train (dotted) and validation (solid) loss of each run against steps and wall clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in run_dirs:
        rows = read_metrics(run)
        name = Path(run).name
        for key, style in (("train_loss", ":"), ("val_loss", "-")):
            pts = [(r["step"], r["wall_time"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            steps, wall, vals = zip(*pts)
            axes[0].plot(steps, vals, style, label=f"{name} {key}")
            axes[1].plot([w / 60 for w in wall], vals, style, label=f"{name} {key}")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall clock (minutes)")
    for ax in axes:
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__)
    p.add_argument("runs", nargs="+", help="run directories written by python -m train")
    p.add_argument("--out", default="curves.png")
    args = p.parse_args(argv)
    try:
        print(plot_runs(args.runs, args.out))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
