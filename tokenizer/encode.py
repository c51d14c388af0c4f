"""Parallel corpus encoding into a flat token file that ``np.memmap`` reads.

The file is cut at special-token boundaries into fixed-size pieces (independent of the number of
workers), each piece encoded by a worker, and the pieces written in order: the output is identical
for every worker count. Output: little-endian uint16 ids (uint32 when the vocab needs it) and a JSON
sidecar ``<out>.json`` with dtype, token count, bytes, tokenizer hash and source.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from tokenizer.pretokenize import boundary_token, chunk_boundaries, read_text, require_file
from tokenizer.progress import progress_bar
from tokenizer.tokenizer import Tokenizer

CHUNK_BYTES = 4 * 2**20

_worker_tok: Tokenizer | None = None


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived during ``encode_file``: its workers were stopped, its temp file removed."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def _signals_noted(received: list[int]):
    """While inside, SIGTERM and SIGINT are appended to ``received`` (main thread only) for the
    encode loop to act on between pieces: raising from the handler itself could land in code that
    swallows exceptions (an at-fork hook, a finalizer) and the encode would go on."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ordered_results(jobs: list, pool, received: list[int]):
    """Each job's ids in order, from ``pool`` (or here), raising ``Interrupted`` once a signal is noted."""
    if pool is None:
        for job in jobs:
            if received:
                raise Interrupted(received[0])
            yield _encode_piece(job)
        return
    it = pool.imap(_encode_piece, jobs)
    for _ in jobs:
        while True:
            if received:
                raise Interrupted(received[0])
            try:
                yield it.next(timeout=0.1)
                break
            except multiprocessing.TimeoutError:
                continue


def _init_worker(tok_dir: str, in_pool: bool = False) -> None:
    global _worker_tok
    if in_pool:  # the parent stops the workers; a Ctrl-C to the whole group must not print tracebacks
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_tok = Tokenizer.load(tok_dir)


def _encode_piece(args: tuple[str, int, int, str]) -> np.ndarray:
    path, start, end, dtype = args
    text = read_text(path, start, end)
    return np.frombuffer(_worker_tok.encode_array(text), dtype=np.uint32).astype(dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _write_pieces(out_path: Path, jobs: list, tokenizer_dir: str, workers: int, bar) -> int:
    """Encode ``jobs`` in order into ``out_path`` through ``<out>.tmp``; returns the token count. On
    any exception or a noted SIGTERM/SIGINT the workers are terminated and the temp file removed."""
    tmp = out_path.with_name(out_path.name + ".tmp")
    n_tokens = 0
    pool = None
    received: list[int] = []
    try:
        with _signals_noted(received), open(tmp, "wb") as out:
            if workers == 1:
                _init_worker(tokenizer_dir)
            else:
                pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer_dir, True))
            for job, ids in zip(jobs, _ordered_results(jobs, pool, received)):
                ids.tofile(out)
                n_tokens += len(ids)
                bar.update(job[2] - job[1])
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
        os.replace(tmp, out_path)
    except BaseException:
        if pool is not None:
            pool.terminate()  # SIGTERM to every worker, then waits for them
            pool.join()
        tmp.unlink(missing_ok=True)
        raise
    return n_tokens


def encode_file(
    tokenizer_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Encode ``input_path`` into ``out_path`` (+ ``.json`` sidecar); returns the sidecar's dict."""
    input_path, out_path = require_file(input_path, "input file"), Path(out_path)
    if out_path.is_dir():  # found now, not when the finished encode is moved into place
        raise FileNotFoundError(f"output is a directory, not a file: {out_path}")
    tok = Tokenizer.load(tokenizer_dir)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out_path.parent}")
    if not os.access(out_path.parent, os.W_OK):
        raise PermissionError(f"output directory is not writable: {out_path.parent}")
    dtype = token_dtype(len(tok))
    bounds = chunk_boundaries(input_path, CHUNK_BYTES, boundary_token(tok.special_tokens))
    jobs = [(str(input_path), a, b, dtype.str) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(jobs) or 1))
    t0 = time.perf_counter()
    bar = progress_bar(progress, total=bounds[-1], unit="B", unit_scale=True, desc="encode")
    try:
        n_tokens = _write_pieces(out_path, jobs, str(tokenizer_dir), workers, bar)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    meta = {
        "dtype": dtype.str,
        "tokens": n_tokens,
        "bytes": bounds[-1],
        "tokenizer_hash": tok.fingerprint(),
        "tokenizer_dir": str(Path(tokenizer_dir).resolve()),
        "source": str(input_path.resolve()),
        "seconds": round(seconds, 3),
        "mb_per_s": round(bounds[-1] / 1e6 / max(seconds, 1e-9), 3),
        "workers": workers,
    }
    Path(str(out_path) + ".json").write_text(json.dumps(meta, indent=2))
    return meta
