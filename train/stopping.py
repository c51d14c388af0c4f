"""When a run stops early: signals and the time budget, agreed on by every rank.

- SIGUSR1 (Slurm's time-limit warning), SIGTERM (scancel, preemption) and SIGINT (Ctrl-C) are
  handled alike: while the run sets up (data preparation, model building) the handler raises
  ``StopRequested`` at once, so an hour of BPE training does not hold the signal; once training
  runs it sets a flag the loop reads after the step, so the state it checkpoints is a whole step.
- ``--time-budget`` is the wall-clock time this process may use, counted from its start: the loop
  stops, evaluates and checkpoints while a reserve (a few steps, an evaluation, a checkpoint) is
  left. The time of earlier restarts is recorded, never charged against it.
- With several ranks the decision is all-reduced (max) at log intervals, where the loop reads the
  device anyway: a signal that reaches any one rank stops all of them at the same step.
"""

from __future__ import annotations

import signal
import time

import torch

from train.errors import StopRequested

HANDLED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# Reasons in order of precedence (the all-reduce keeps the largest).
REASONS = [None, "time budget", "SIGUSR1", "SIGTERM", "SIGINT"]


class StopControl:
    def __init__(self, time_budget: float | None, process_start: float, distributed: bool):
        self.time_budget, self.process_start, self.distributed = time_budget, process_start, distributed
        self.signal: str | None = None
        self.training = False
        self._previous: dict = {}

    def install(self) -> None:
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal is None:
                self.signal = name
            # Several ranks agree first (at the poll before the first step): one rank leaving
            # set-up alone would leave the others waiting in a collective.
            if not self.training and not self.distributed:
                raise StopRequested(name)

        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (some embedding test runners)
                pass

    def uninstall(self) -> None:
        """Give the signals back to whoever handled them before (a process that trains twice, tests)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def enter_training(self) -> None:
        """From now on a signal sets the flag; one that arrived during set-up stops the first step."""
        self.training = True

    def elapsed(self) -> float:
        return time.time() - self.process_start

    def out_of_time(self, reserve_s: float) -> bool:
        return self.time_budget is not None and self.elapsed() + reserve_s >= self.time_budget

    def poll(self, reserve_s: float, sync_point: bool) -> str | None:
        """The reason to stop after this step, or None. Multi-rank runs decide only at
        ``sync_point`` steps (log intervals), all ranks together."""
        local = self.signal or ("time budget" if self.out_of_time(reserve_s) else None)
        if not self.distributed:
            return local
        if not sync_point:
            return None
        import torch.distributed as dist

        backend = dist.get_backend()
        code = torch.tensor([REASONS.index(local)], device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(code, op=dist.ReduceOp.MAX)
        return REASONS[int(code.item())]
