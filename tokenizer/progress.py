"""Progress bars that cost nothing when hidden: tqdm (~90 ms to import, a third of a small
training run's start-up) is loaded only when a bar is actually shown."""

from __future__ import annotations


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


def progress_bar(show: bool, **tqdm_kwargs):
    """A ``tqdm.auto`` bar with ``tqdm_kwargs`` when ``show``, else a stand-in with the same surface."""
    if not show:
        return _Hidden()
    from tqdm.auto import tqdm

    return tqdm(**tqdm_kwargs)
