"""A synthetic training corpus for scale tests: Zipf-distributed words from a large random lexicon.

``python -m tokenizer.zipf_corpus --gb 1 --out /tmp/zipf_1gb.txt`` writes the same bytes for the
same ``--gb``/``--words``/``--seed`` on every machine: words of 2-12 lowercase letters (some
capitalised, some with digits or punctuation), Zipf rank frequencies (exponent 1.1), lines of
~12 words, documents of ~300 words ended by ``<|endoftext|>``. The number of unique pretokens grows
with the size (the tail of the lexicon keeps appearing), as in real web text.
"""

from __future__ import annotations

import argparse

import numpy as np

EOT = b"<|endoftext|>"


def lexicon(n_words: int, rng: np.random.Generator) -> list[bytes]:
    lengths = rng.integers(2, 13, size=n_words)
    letters = rng.integers(ord("a"), ord("z") + 1, size=int(lengths.sum()), dtype=np.uint8).tobytes()
    words, pos = [], 0
    extras = rng.random(n_words)
    for i, n in enumerate(lengths.tolist()):
        w = letters[pos : pos + n]
        pos += n
        if extras[i] < 0.1:
            w = w[:1].upper() + w[1:]
        elif extras[i] < 0.13:
            w = w + str(i % 1000).encode()
        elif extras[i] < 0.18:
            w = w + b"."
        words.append(w)
    return words


def write_corpus(out: str, n_bytes: int, n_words: int = 4_000_000, seed: int = 0, exponent: float = 1.1) -> int:
    """Write about ``n_bytes`` of corpus to ``out``; returns the bytes written."""
    rng = np.random.default_rng(seed)
    words = np.array(lexicon(n_words, rng), dtype=object)
    written = 0
    batch = 1 << 20
    with open(out, "wb") as f:
        while written < n_bytes:
            idx = rng.zipf(exponent, size=batch) - 1
            idx = idx[idx < n_words]
            sep = np.full(len(idx), b" ", dtype=object)
            r = rng.random(len(idx))
            sep[r < 1 / 12] = b"\n"
            sep[r < 1 / 300] = b"\n" + EOT + b"\n"
            chunk = b"".join((words[idx] + sep).tolist())
            f.write(chunk)
            written += len(chunk)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenizer.zipf_corpus", description=__doc__)
    p.add_argument("--gb", type=float, required=True, help="corpus size in GB (1e9 bytes)")
    p.add_argument("--out", required=True, help="output text file")
    p.add_argument("--words", type=int, default=4_000_000, help="lexicon size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    n = write_corpus(args.out, int(args.gb * 1e9), args.words, args.seed)
    print(f"wrote {n / 1e9:.3f} GB to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
