"""Byte-level BPE training (the CS336 handout's algorithm), multiprocess pretokenization.

1. The file is cut into pieces at special-token boundaries and pretokenized by a pool of workers;
   each returns the counts of its unique pretokens, so memory follows the number of unique
   pretokens, never the corpus size (pieces are read one at a time, never the whole file).
2. Merges run over the unique pretokens with incremental pair counts: a pair -> words index and a
   max-heap with lazy re-checks, so each merge touches only the words that contain the pair.

Ties between equally frequent pairs go to the lexicographically greater pair of byte strings.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict

from tokenizer import native
from tokenizer.pretokenize import (
    PRETOKEN_RE,
    SpecialFinder,
    boundary_token,
    chunk_boundaries,
    read_bytes,
    read_text,
    require_file,
    special_splitter,
    split_on_specials,
)
from tokenizer.progress import progress_bar
from tokenizer.special import validate_special_tokens

CHUNK_BYTES = 8 * 2**20  # per piece for the process pool (each piece costs a process round trip)
NATIVE_CHUNK_BYTES = 2 * 2**20  # per piece for the threads: small pieces keep peak memory low


def _count_chunk(args: tuple[str, int, int, tuple[str, ...]]) -> Counter:
    """The pure-Python path's counts of one file piece (run in a pool process)."""
    path, start, end, specials = args
    text = read_text(path, start, end)
    splitter = special_splitter(specials)
    counts: Counter = Counter()
    for i, part in enumerate(split_on_specials(text, splitter)):
        if i % 2 == 0 and part:
            counts.update(m.encode("utf-8") for m in PRETOKEN_RE.findall(part))
    return counts


def _jobs(path: str, special_tokens: list[str], chunk_bytes: int) -> list[tuple[int, int]]:
    bounds = chunk_boundaries(path, chunk_bytes, boundary_token(special_tokens))
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def count_pretokens_native(
    input_path: str | os.PathLike, special_tokens: list[str], num_workers: int | None = None, progress: bool = False
):
    """The compiled core's ``PretokenCounter`` over the file: pieces read and counted by threads
    (the core releases the GIL), each piece's counts added to one native table. Memory follows
    the unique pretokens (~50 bytes each plus their bytes), never the corpus."""
    core = native.load()
    path = str(input_path)
    finder = SpecialFinder(special_tokens)
    counter = core.PretokenCounter()
    jobs = _jobs(path, special_tokens, NATIVE_CHUNK_BYTES)

    def count(job: tuple[int, int]) -> int:
        raw = read_bytes(path, *job)
        counter.add_text(raw, [(a, b) for a, b, _ in finder.spans(raw)])
        return job[1] - job[0]

    size = jobs[-1][1] if jobs else 0
    with progress_bar(progress, total=size, unit="B", unit_scale=True, desc="pretokenize") as bar:
        workers = min(num_workers or os.cpu_count() or 1, max(1, len(jobs)))
        if workers == 1:
            for job in jobs:
                bar.update(count(job))
        else:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=workers)
            try:
                for n in pool.map(count, jobs):
                    bar.update(n)
            finally:  # on Ctrl-C: drop the queued pieces, let the running ones (one each) finish
                pool.shutdown(wait=True, cancel_futures=True)
    return counter


def count_pretokens(
    input_path: str | os.PathLike,
    special_tokens: list[str],
    num_workers: int | None = None,
    progress: bool = False,
    use_native: bool = True,
) -> Counter:
    """Counts of every pretoken (as UTF-8 bytes) in the file, documents split on the special tokens.

    With the compiled core the pieces are counted by threads into one native table (see
    ``count_pretokens_native``); without it, by a process pool."""
    if use_native and native.load() is not None:
        return Counter(count_pretokens_native(input_path, special_tokens, num_workers, progress).to_dict())
    path = str(input_path)
    workers = num_workers or os.cpu_count() or 1
    jobs = [(path, a, b, tuple(special_tokens)) for a, b in _jobs(path, special_tokens, CHUNK_BYTES)]
    total: Counter = Counter()
    bar = progress_bar(progress, total=jobs[-1][2] if jobs else 0, unit="B", unit_scale=True, desc="pretokenize")
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            total.update(_count_chunk(job))
            bar.update(job[2] - job[1])
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for job, counts in zip(jobs, pool.map(_count_chunk, jobs)):
                total.update(counts)
                bar.update(job[2] - job[1])
    bar.close()
    return total


class _Desc:
    """Heap key ordering byte-string pairs descending, so a min-heap pops the greatest pair first."""

    __slots__ = ("key",)

    def __init__(self, key: tuple[bytes, bytes]):
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return self.key > other.key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.key == other.key


# long: the handout's merge loop over shared tables (words, counts, pair index, heap); split, each
# part would take all of them
def merge_pretokens(
    pretoken_counts: dict[bytes, int], num_merges: int, progress: bool = False
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Run ``num_merges`` BPE merges over pretoken counts; returns (vocab of 256 + merges, merges)."""
    vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
    words: list[list[int]] = []
    freqs: list[int] = []
    for tok, c in pretoken_counts.items():
        if len(tok) > 1:
            words.append(list(tok))
            freqs.append(c)
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            pair_words[pair].add(wi)
    heap = [(-c, _Desc((vocab[a], vocab[b])), a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    bar = progress_bar(progress, total=num_merges, desc="merges")
    while len(merges) < num_merges and heap:
        negc, _, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -negc or negc == 0:
            continue  # stale entry: the pair's count changed after it was pushed
        new_id = len(vocab)
        vocab[new_id] = vocab[a] + vocab[b]
        merges.append((vocab[a], vocab[b]))
        bar.update(1)
        touched: set[tuple[int, int]] = set()
        for wi in pair_words.pop((a, b), ()):
            w = words[wi]
            f = freqs[wi]
            for pair in zip(w, w[1:]):
                pair_counts[pair] -= f
                touched.add(pair)
            out: list[int] = []
            i = 0
            n = len(w)
            while i < n:
                if i + 1 < n and w[i] == a and w[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[wi] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += f
                pair_words[pair].add(wi)
                touched.add(pair)
        pair_counts.pop((a, b), None)
        for pair in touched:
            c = pair_counts.get(pair, 0)
            if c > 0:
                heapq.heappush(heap, (-c, _Desc((vocab[pair[0]], vocab[pair[1]])), pair[0], pair[1]))
            else:
                pair_counts.pop(pair, None)
    bar.close()
    return vocab, merges


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: list[str] | None = None,
    num_workers: int | None = None,
    progress: bool = False,
    use_native: bool = True,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE; vocab = 256 bytes + merges + special tokens, exactly ``vocab_size``.

    Fewer merges are made only when the corpus runs out of pairs (the vocab is then smaller).
    ``use_native=False`` forces the pure-Python path (the compiled core gives the same result).
    """
    special_tokens = validate_special_tokens(list(special_tokens or []), "training special tokens")
    path = require_file(input_path, "training corpus")
    if path.stat().st_size == 0:
        raise ValueError(f"training corpus is empty: {path}")
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is below 256 byte tokens + {len(special_tokens)} special tokens")
    num_merges = vocab_size - 256 - len(special_tokens)
    core = native.load() if use_native else None
    if core is not None:
        counter = count_pretokens_native(path, special_tokens, num_workers, progress)
        if len(counter) == 0:
            raise ValueError(f"training corpus has no text outside special tokens: {path}")
        with progress_bar(progress, total=num_merges, desc="merges") as bar:
            merges = core.merge_counts(counter, num_merges, lambda done: bar.update(done - bar.n), consume=True)
        vocab = {i: bytes([i]) for i in range(256)}
        for a, b in merges:
            vocab[len(vocab)] = a + b
    else:
        counts = count_pretokens(path, special_tokens, num_workers, progress, use_native=False)
        if not counts:
            raise ValueError(f"training corpus has no text outside special tokens: {path}")
        vocab, merges = merge_pretokens(counts, num_merges, progress)
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab, merges
