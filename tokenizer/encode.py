"""Parallel corpus encoding into a flat token file that ``np.memmap`` reads.

The file is cut at special-token boundaries into fixed-size pieces (independent of the number of
workers), each piece encoded by a worker, and the pieces written in order: the output is identical
for every worker count. Output: little-endian uint16 ids (uint32 when the vocab needs it) and a JSON
sidecar ``<out>.json`` with dtype, token count, bytes, tokenizer hash and source.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tokenizer.pretokenize import boundary_token, chunk_boundaries, read_text
from tokenizer.tokenizer import Tokenizer

CHUNK_BYTES = 4 * 2**20

_worker_tok: Tokenizer | None = None


def _init_worker(tok_dir: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer.load(tok_dir)


def _encode_piece(args: tuple[str, int, int, str]) -> np.ndarray:
    path, start, end, dtype = args
    text = read_text(path, start, end)
    return np.asarray(_worker_tok.encode(text), dtype=dtype)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def encode_file(
    tokenizer_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Encode ``input_path`` into ``out_path`` (+ ``.json`` sidecar); returns the sidecar's dict."""
    input_path, out_path = Path(input_path), Path(out_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    tok = Tokenizer.load(tokenizer_dir)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out_path.parent}")
    if not os.access(out_path.parent, os.W_OK):
        raise PermissionError(f"output directory is not writable: {out_path.parent}")
    dtype = token_dtype(len(tok))
    bounds = chunk_boundaries(input_path, CHUNK_BYTES, boundary_token(tok.special_tokens))
    jobs = [(str(input_path), a, b, dtype.str) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(jobs) or 1))
    tmp = out_path.with_name(out_path.name + ".tmp")
    n_tokens = 0
    t0 = time.perf_counter()
    bar = tqdm(total=bounds[-1], unit="B", unit_scale=True, desc="encode", disable=not progress)
    try:
        with open(tmp, "wb") as out:
            if workers == 1:
                _init_worker(str(tokenizer_dir))
                results = map(_encode_piece, jobs)
                pool = None
            else:
                pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),))
                results = pool.map(_encode_piece, jobs)
            try:
                for job, ids in zip(jobs, results):
                    ids.tofile(out)
                    n_tokens += len(ids)
                    bar.update(job[2] - job[1])
            finally:
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
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
