"""Progress bars that cost nothing when hidden: tqdm (~90 ms to import, a third of a small
training run's start-up) is loaded only when a bar is actually shown."""

from __future__ import annotations

import sys


class _Hidden:
    """What the tokenizer uses of a tqdm bar (``update``, ``n``, ``close``, a context), doing nothing."""

    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass

    def __enter__(self) -> _Hidden:
        return self

    def __exit__(self, *exc) -> None:
        pass


# Without a terminal (a Slurm log, nohup, CI) a bar is redrawn this rarely: a line every 30 s and
# the last one, not the dozens a second that a terminal gets, each a line in the log.
LOG_INTERVAL_S = 30.0


def progress_bar(show: bool, **tqdm_kwargs):
    """A ``tqdm.auto`` bar with ``tqdm_kwargs`` when ``show``, else a stand-in with the same surface."""
    if not show:
        return _Hidden()
    from tqdm.auto import tqdm

    out = tqdm_kwargs.get("file") or sys.stderr
    if not (hasattr(out, "isatty") and out.isatty()):
        tqdm_kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(**tqdm_kwargs)
