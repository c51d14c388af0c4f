"""Sweeps: a grid defined once in a sweep file, run as a Slurm job array or locally, then summarised.

A sweep file (TOML or JSON)::

    name = "lr"                # runs are named <name>-<key>=<value>-...
    preset = "tinystories"
    max_concurrent = 4         # the %K of --array
    [fixed]                    # settings shared by every run (any python -m train flag, as field names)
    max_steps = 5000
    [grid]                     # the varied settings: every combination is one array task
    lr = [3e-4, 1e-3, 3e-3]

Commands::

    python -m train.sweep count SWEEP          # number of configurations
    python -m train.sweep args SWEEP INDEX     # the python -m train arguments of one configuration
    python -m train.sweep array SWEEP          # the --array value, e.g. 0-2%4
    python -m train.sweep run SWEEP            # without Slurm: every configuration, one after another
    python -m train.sweep summarize DIR        # table and plots of a sweep's runs
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import statistics
import sys
from pathlib import Path


def load_sweep(path: str | Path) -> dict:
    from train.config import read_settings_file

    p = Path(path)
    data = read_settings_file(p, "sweep file")
    grid = data.get("grid") or {}
    if not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{p}: [grid] must map each varied setting to a non-empty list of values")
    data.setdefault("name", p.stem)
    data.setdefault("fixed", {})
    data.setdefault("max_concurrent", 4)
    return data


def configurations(sweep: dict) -> list[dict]:
    keys = list(sweep["grid"])
    return [dict(zip(keys, values)) for values in itertools.product(*(sweep["grid"][k] for k in keys))]


def run_name(sweep: dict, config: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    return sweep["name"] + "-" + "-".join(f"{k}={fmt(v)}" for k, v in config.items())


def _flag(key: str, value) -> list[str]:
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + key.replace("_", "-")]
    return [flag, str(value)]


def train_args(sweep: dict, index: int, out_dir: str | None = None) -> list[str]:
    configs = configurations(sweep)
    if not 0 <= index < len(configs):
        raise IndexError(f"configuration {index} out of range: the sweep has {len(configs)}")
    config = configs[index]
    args = ["--preset", sweep.get("preset", "tinystories")]
    fixed = dict(sweep["fixed"])
    out = out_dir or fixed.pop("out_dir", None) or sweep.get("out_dir") or f"runs/{sweep['name']}"
    for k, v in {**fixed, **config}.items():
        args += _flag(k, v)
    args += ["--run-name", run_name(sweep, config), "--out-dir", str(out)]
    return args


def array_spec(sweep: dict) -> str:
    n = len(configurations(sweep))
    return f"0-{n - 1}%{max(1, int(sweep['max_concurrent']))}"


# --- summaries ------------------------------------------------------------------------------------


# Settings that name or place a run rather than change it: never "swept".
_NOT_SWEPT = ("run_name", "out_dir", "resume", "data_dir")


def run_settings(run: str | Path) -> dict:
    """A run's settings from its config.json (the preset, then the model and run sections), {}
    without one."""
    path = Path(run) / "config.json"
    if not path.exists():
        return {}
    config = json.loads(path.read_text())
    return {"preset": config.get("preset"), **config.get("model", {}), **config.get("run", {})}


def swept_settings(settings: list[dict]) -> list[str]:
    """The settings whose values differ between runs, in config order."""
    keys = [k for k in dict.fromkeys(k for s in settings for k in s) if k not in _NOT_SWEPT]
    return [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]


def run_summary(run: str | Path) -> dict:
    """One run directory's final/best validation loss, final train loss, tokens/s and MFU (medians
    over the log intervals: the first one holds compilation and autotuning), wall time, status and
    settings (from config.json); ``diverged`` flags a non-finite loss or a validation loss that
    climbed well above its best."""
    from train.plot import read_metrics

    run = Path(run)
    metrics = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    vals = [m["val_loss"] for m in metrics if m.get("val_loss") is not None]
    train = [m["train_loss"] for m in metrics if m.get("train_loss") is not None]
    tps = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
    mfu = [m["mfu"] for m in metrics if m.get("mfu")]
    status = summary.get("status", "running?")
    return {
        "run": run.name,
        "settings": run_settings(run),
        "status": status,
        "steps": summary.get("step", metrics[-1]["step"] if metrics else 0),
        "final_train_loss": train[-1] if train else None,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "tokens_per_s": statistics.median(tps) if tps else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "wall_time_s": summary.get("wall_time_total", summary.get("wall_time"))
        or (metrics[-1].get("wall_time") if metrics else None),
        "diverged": status == "diverged"
        or any(not math.isfinite(x) for x in train)
        or (len(vals) > 1 and vals[-1] > 1.5 * min(vals)),
        "train_curve": {m["step"]: m["train_loss"] for m in metrics if m.get("train_loss") is not None},
    }


def _cell(v, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if nd else f"{v:.0f}"
    return str(v)


def runs_table(rows: list[dict]) -> str:
    """A Markdown table of ``run_summary`` rows, best validation loss first, with a column for each
    swept setting."""
    swept = swept_settings([r["settings"] for r in rows])
    head = ["run", *swept, "status", "steps", "final train", "final val", "best val", "tokens/s", "MFU", "wall s"]
    head.append("diverged")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["best_val_loss"] is None, r["best_val_loss"] or 0)):
        cells = [r["run"], *(_fmt_setting(r["settings"].get(k)) for k in swept), r["status"], str(r["steps"])]
        cells += [_cell(r[k]) for k in ("final_train_loss", "final_val_loss", "best_val_loss")]
        cells += [_cell(r["tokens_per_s"], 0), "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
        cells += [_cell(r["wall_time_s"], 1), "DIVERGED" if r["diverged"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_setting(v) -> str:
    return "-" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def summarize(sweep_dir: str | Path, out: str | Path | None = None) -> tuple[str, list[dict]]:
    """A Markdown table of each run's swept settings, final/best validation loss, tokens/s, MFU, wall
    time and status, diverged runs flagged; writes curves (vs steps and wall clock) and, for each
    numeric swept setting, best validation loss against it (swept_value.png)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory {sweep_dir}")
    runs = sorted(p for p in sweep_dir.iterdir() if (p / "metrics.jsonl").exists() or (p / "summary.json").exists())
    if not runs:
        raise FileNotFoundError(f"no runs (directories with metrics.jsonl) under {sweep_dir}")
    rows = [run_summary(run) for run in runs]
    table = runs_table(rows)
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    from train.plot import plot_runs

    plot_runs(
        [str(sweep_dir / r["run"]) for r in rows if (sweep_dir / r["run"] / "metrics.jsonl").exists()],
        out / "curves.png",
    )
    plot_swept_settings(rows, out / "swept_value.png")
    (out / "summary.md").write_text(table + "\n")
    return table, rows


def swept_series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """For each numeric swept setting, (value, best validation loss) of the runs that have one,
    sorted by value."""
    series = {}
    for k in swept_settings([r["settings"] for r in rows]):
        pts = [
            (float(r["settings"][k]), r["best_val_loss"])
            for r in rows
            if r["best_val_loss"] is not None
            and isinstance(r["settings"].get(k), (int, float))
            and not isinstance(r["settings"].get(k), bool)
        ]
        if pts:
            series[k] = sorted(pts)
    return series


def log_axis(name: str, values: list[float]) -> bool:
    """Learning rates (and weight decays) always, other positive settings spanning 20x or more."""
    if not values or min(values) <= 0:
        return False
    return name.endswith("lr") or name == "weight_decay" or max(values) / min(values) >= 20


def plot_swept_settings(rows: list[dict], path: Path) -> list[tuple[str, str]]:
    """Best validation loss against each numeric swept setting, one panel per setting, the x axis
    named after it (log scale for learning rates). Returns each panel's (x label, x scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = swept_series(rows)
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(5 * max(1, len(series)), 4), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
        if log_axis(k, [p[0] for p in pts]):
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel("best validation loss")
        ax.grid(alpha=0.3)
    if not series:
        axes[0][0].set_title("no numeric setting varies between the runs")
    panels = [(ax.get_xlabel(), ax.get_xscale()) for ax in axes[0][: len(series)]]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return panels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("count", "array", "run"):
        s = sub.add_parser(name)
        s.add_argument("sweep")
        if name == "run":
            s.add_argument("--out-dir", default=None)
    s = sub.add_parser("args")
    s.add_argument("sweep")
    s.add_argument("index", type=int)
    s.add_argument("--out-dir", default=None)
    s = sub.add_parser("summarize")
    s.add_argument("dir")
    s.add_argument("--out", default=None, help="where summary.md and the plots go (default: DIR)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "summarize":
            table, _ = summarize(args.dir, args.out)
            print(table)
            return 0
        sweep = load_sweep(args.sweep)
        if args.cmd == "count":
            print(len(configurations(sweep)))
        elif args.cmd == "array":
            print(array_spec(sweep))
        elif args.cmd == "args":
            print(shlex.join(train_args(sweep, args.index, args.out_dir)))
        elif args.cmd == "run":
            from train.cli import main as train_main

            codes = []
            for i in range(len(configurations(sweep))):
                a = train_args(sweep, i, args.out_dir)
                print(f"[{i + 1}/{len(configurations(sweep))}] python -m train {shlex.join(a)}", file=sys.stderr)
                codes.append(train_main(a))
            return 0 if all(c == 0 for c in codes) else 1
    except (FileNotFoundError, ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
