"""How ``python -m train`` ends: its exit codes, and the two exceptions that are not bugs.

| code | meaning | what a job script does |
|---|---|---|
| 0 | finished (max steps or tokens reached) | ends the job |
| 1 | user error: one line naming the file or flag | ends the job |
| 2 | diverged (non-finite loss or grad norm; the newest checkpoint is finite) | ends the job |
| 3 | paused: SIGUSR1 or ``--time-budget`` reached, checkpoint written | requeues; the rerun resumes |
| 4 | interrupted by SIGTERM or SIGINT, checkpoint written (resumable) | leaves it to Slurm |
| 64 | usage error (unknown flag, bad flag value), from argparse | ends the job |
| 70 | internal error: a bug or a failure we did not anticipate, with its traceback | ends the job |

A run stopped by an error (1 or 70) once its run directory exists leaves ``summary.json`` with
status "failed", its exit code and the message.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_DIVERGED = 2
EXIT_PAUSED = 3
EXIT_INTERRUPTED = 4
EXIT_USAGE = 64
EXIT_INTERNAL = 70

# summary.json "status" values and the exit code each ends with.
STATUS_EXIT = {
    "finished": EXIT_OK,
    "diverged": EXIT_DIVERGED,
    "time budget reached": EXIT_PAUSED,
    "interrupted by SIGUSR1": EXIT_PAUSED,
    "interrupted by SIGTERM": EXIT_INTERRUPTED,
    "interrupted by SIGINT": EXIT_INTERRUPTED,
}


class UserError(ValueError):
    """Something the user can fix (a flag, a file, a directory, the disk): printed as one line.
    A ValueError, as most are bad values of a setting."""


class TrainingDiverged(Exception):
    """Non-finite loss, grad norm or state: the run stops without writing that state."""


class StopRequested(BaseException):
    """A signal arrived while the run was setting up (data preparation, model building): raised from
    the handler so a long preparation does not hold the signal for hours. ``BaseException`` so that
    no ``except Exception`` on the way swallows it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
