"""``python -m tokenizer train|encode``: train a BPE on a text file, encode a corpus to token ids."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _children_peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def _prepare() -> int:
    """Build (once per machine) and load the compiled core before the clock starts, so that neither
    the compile's seconds nor the compiler's memory are counted as the work's; returns the children's
    peak so far, the baseline for :func:`_peak_rss_mb`."""
    from tokenizer import native

    native.load()
    return _children_peak_kib()


def _peak_rss_mb(children_before: int) -> tuple[float, float]:
    """(this process, the largest worker process) peak resident memory in MB (Linux reports KiB).
    The children's peak is a maximum over every child ever waited for: a worker is reported only
    when it raised that maximum above ``children_before`` (0 when none did; on a machine's first
    run, workers smaller than the compiler go unreported)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = _children_peak_kib()
    return own, (child / 1024 if child > children_before else 0.0)


def cmd_train(args: argparse.Namespace) -> int:
    from tokenizer.bpe_train import train_bpe
    from tokenizer.pretokenize import require_dir
    from tokenizer.tokenizer import Tokenizer

    # Fail on an unwritable output before the training, not after it.
    require_dir(args.out, "--out", may_be_missing=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        raise PermissionError(f"output directory is not writable: {args.out}")
    try:
        # A missing input fails in train_bpe at once, not after a first run's compile.
        children_before = _prepare() if Path(args.input).is_file() else _children_peak_kib()
        t0 = time.perf_counter()
        vocab, merges = train_bpe(
            args.input, args.vocab_size, args.special_token, args.workers, progress=not args.quiet
        )
    except KeyboardInterrupt:  # Ctrl-C in either phase (the native merge loop checks for it too)
        print(f"error: training stopped by SIGINT: nothing written to {args.out}", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    tok = Tokenizer(vocab, merges, args.special_token)
    out = tok.save(args.out)
    own, child = _peak_rss_mb(children_before)
    specials = {s.encode() for s in args.special_token}
    longest = sorted((b for b in vocab.values() if b not in specials), key=len, reverse=True)[:5]
    meta = json.loads((out / "meta.json").read_text())  # save's checks (files, counts), then the run's facts
    meta |= {
        "input": str(Path(args.input).resolve()),
        "vocab_size": len(vocab),
        "merges": len(merges),
        "special_tokens": args.special_token,
        "workers": args.workers,
        "seconds": round(seconds, 3),
        "peak_rss_mb_main": round(own, 1),
        "peak_rss_mb_largest_worker": round(child, 1),
        "longest_tokens": [b.decode("utf-8", errors="replace") for b in longest],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    print(f"trained {len(vocab)} tokens ({len(merges)} merges) in {seconds:.2f} s -> {out}")
    # The compiled core counts in threads of this process; worker processes only without it.
    print(f"peak memory: {own:.0f} MB" + (f", largest worker process {child:.0f} MB" if child else ""))
    print("longest tokens: " + ", ".join(repr(b.decode("utf-8", errors="replace")) for b in longest))
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from tokenizer.encode import Interrupted, encode_file

    try:
        children_before = _prepare()
    except KeyboardInterrupt:  # during a first run's compile
        print(f"error: encode stopped by SIGINT: nothing written to {args.out}", file=sys.stderr)
        return 130
    try:
        meta = encode_file(args.tokenizer, args.input, args.out, args.workers, progress=not args.quiet)
    except Interrupted as e:
        print(f"error: encode {e}: workers stopped, nothing written to {args.out}", file=sys.stderr)
        return 128 + e.signum
    own, child = _peak_rss_mb(children_before)
    import numpy as np  # loaded by the encode already

    dtype = np.dtype(meta["dtype"]).name  # "uint16", not the sidecar's "<u2"
    print(
        f"{meta['tokens']:,} tokens ({dtype}) from {meta['bytes'] / 1e6:.1f} MB in {meta['seconds']:.2f} s "
        f"= {meta['mb_per_s']:.2f} MB/s with {meta['workers']} worker{'s' * (meta['workers'] != 1)} -> {args.out}"
    )
    print(f"peak memory: {own:.0f} MB" + (f", largest worker process {child:.0f} MB" if child else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenizer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a byte-level BPE on a UTF-8 text file")
    t.add_argument("--input", required=True, help="UTF-8 training corpus")
    t.add_argument("--vocab-size", type=int, required=True, help="final vocab size (256 bytes + merges + specials)")
    t.add_argument(
        "--special-token", action="append", default=[], help="a special token (repeatable), e.g. '<|endoftext|>'"
    )
    t.add_argument(
        "--out", required=True, help="output directory (vocab.json, merges.txt, special_tokens.json, meta.json)"
    )
    t.add_argument("--workers", type=int, default=None, help="pretokenization processes (default: all cores)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("encode", help="encode a text file into a flat uint16/uint32 token file")
    e.add_argument("--tokenizer", required=True, help="directory written by 'train' (or Tokenizer.save)")
    e.add_argument("--input", required=True, help="UTF-8 text file")
    e.add_argument("--out", required=True, help="output .bin file (a .json sidecar is written beside it)")
    e.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_encode)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "workers", None) is not None and args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (FileNotFoundError, PermissionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
