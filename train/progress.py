"""What a person watching a run sees: a progress bar on a terminal, one plain line per log interval
elsewhere (Slurm logs, ``nohup``, CI), nothing with ``--quiet``, and a closing summary always."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}"


def progress_line(record: dict, max_steps: int, eta_s: float | None) -> str:
    """``step 120/200 | loss 3.412 | val 3.501 | 12,345 tok/s | MFU 31.2% | 45.1 ms/step | ETA 0:00:03``"""
    parts = [f"step {record['step']}/{max_steps}" if max_steps < 10**12 else f"step {record['step']}"]
    if record.get("train_loss") is not None:
        parts.append(f"loss {record['train_loss']:.4f}")
    if record.get("val_loss") is not None:
        parts.append(f"val {record['val_loss']:.4f}")
    if record.get("tokens_per_s") is not None:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("step_time_ms") is not None:
        parts.append(f"{record['step_time_ms']:.1f} ms/step")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


class Progress:
    """``mode``: "bar" (tqdm), "lines" (one line per log) or "quiet"; "auto" picks the bar on a
    terminal and lines elsewhere."""

    def __init__(self, mode: str, max_steps: int, first_step: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode if enabled else "quiet"
        self.max_steps, self.first_step = max_steps, first_step
        self.t0 = time.time()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, initial=first_step, desc="train", dynamic_ncols=True, file=self.stream)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, record: dict) -> None:
        """A log interval's record (step, losses, tokens/s, MFU, step time)."""
        if self.mode == "quiet" or "train_loss" not in record and "val_loss" not in record:
            return
        done = record["step"] - self.first_step
        eta = None
        if done > 0 and self.max_steps < 10**12:
            eta = (time.time() - self.t0) / done * (self.max_steps - record["step"])
        if self.bar is not None:
            post = {}
            if record.get("train_loss") is not None:
                post["loss"] = f"{record['train_loss']:.3f}"
            if record.get("tokens_per_s") is not None:
                post["tok/s"] = f"{record['tokens_per_s']:,.0f}"
            if record.get("mfu") is not None:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            if record.get("val_loss") is not None:
                post["val"] = f"{record['val_loss']:.3f}"
            self.bar.set_postfix(post)
        else:
            print(progress_line(record, self.max_steps, eta), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def closing_summary(summary: dict, run_dir) -> str:
    """The lines printed when a run ends, in every mode."""

    def loss(v):
        return f"{v:.4f}" if isinstance(v, float) else "-"

    return "\n".join(
        [
            f"{summary['status']} at step {summary['step']}; run directory: {run_dir}",
            f"  final train loss {loss(summary.get('final_train_loss'))}, final val loss "
            f"{loss(summary.get('final_val_loss'))}, best val loss {loss(summary.get('best_val_loss'))}",
            f"  {summary['tokens']:,} tokens; this process {_duration(summary['wall_time'])}, "
            f"all restarts {_duration(summary['wall_time_total'])}",
        ]
    )
