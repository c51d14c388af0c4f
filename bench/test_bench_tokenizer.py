"""Tokenizer benchmarks on ../shared/data/novels100.txt: BPE training against Hugging Face
``tokenizers`` (and rustbpe when installed), encoding against tiktoken, as ratios in one run."""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "novels100.txt"
GPT2 = ROOT.parent / "shared" / "data"
EOT = "<|endoftext|>"
WORKERS = min(2, os.cpu_count() or 1)

pytestmark = pytest.mark.skipif(not CORPUS.exists(), reason=f"benchmark corpus not found: {CORPUS}")


def _corpus(tmp_path_factory, quick):
    if not quick:
        return CORPUS
    small = tmp_path_factory.mktemp("corpus") / "novels_10mb.txt"
    with open(CORPUS, "rb") as f:
        data = f.read(10 * 2**20)
    small.write_bytes(data[: data.rfind(EOT.encode())])
    return small


def _run_measured(cmd: list[str], env=None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system) of a command's whole process
    tree: the parent's peak plus its largest child's (what getrusage can see of children). CPU time
    leaves out waiting on the disk and time the shared host gives to others; wall time does not."""
    code = (
        "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
        f"r = subprocess.run({cmd!r}, capture_output=True); dt = time.perf_counter() - t; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps([r.returncode, dt, u.ru_maxrss, u.ru_utime + u.ru_stime, r.stderr.decode()[-2000:]]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    rc, dt, child_kb, cpu, err = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 0, err
    return dt, child_kb / 1024, cpu


def _warm_page_cache(path: Path) -> float:
    """Read ``path`` once (seconds taken) so a timed run reads it from memory, not the disk: this
    machine's page cache is emptied between runs now and then, and a cold 4 GB read alone took
    longer than training on it (the ladder's spread was 1.45 cold, 1.07 warm, the same hour)."""
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * 2**20):
            pass
    return time.perf_counter() - t


@pytest.fixture(scope="module", autouse=True)
def _core_built():
    """The compiled core built before anything is timed: a changed ``bpe_core.cpp`` compiles once
    (~15 s), which the first timed CLI run would otherwise include."""
    from tokenizer import native

    native.load()


def test_bpe_training_vs_hf_tokenizers(benchmark, tmp_path_factory, results, quick):
    corpus = _corpus(tmp_path_factory, quick)
    out = tmp_path_factory.mktemp("bpe")
    measured = {}
    ours_cmd = [
        sys.executable,
        "-m",
        "tokenizer",
        "train",
        "--input",
        str(corpus),
        "--vocab-size",
        "10000",
        "--special-token",
        EOT,
        "--out",
        str(out),
        "--workers",
        str(WORKERS),
        "--quiet",
    ]
    benchmark.pedantic(lambda: measured.update(ours=_run_measured(ours_cmd)[0]), rounds=1, iterations=1)
    ours_s = measured["ours"]
    meta = json.loads((out / "meta.json").read_text())
    ours_mem = meta["peak_rss_mb_main"] + WORKERS * meta["peak_rss_mb_largest_worker"]
    hf_code = (
        "from tokenizers import ByteLevelBPETokenizer; import sys; "
        "t = ByteLevelBPETokenizer(); "
        f"t.train([{str(corpus)!r}], vocab_size=10000, special_tokens=[{EOT!r}], show_progress=False)"
    )
    env = {**os.environ, "RAYON_NUM_THREADS": str(WORKERS)}
    hf_s, hf_mem, _ = _run_measured([sys.executable, "-c", hf_code], env=env)
    row = dict(
        kind="tokenizer_train",
        corpus=corpus.name,
        corpus_mb=corpus.stat().st_size / 1e6,
        vocab_size=10000,
        workers=WORKERS,
        ours_s=ours_s,
        hf_tokenizers_s=hf_s,
        ratio_vs_hf=ours_s / hf_s,
        ours_peak_mb_all_processes=ours_mem,
        hf_peak_mb=hf_mem,
    )
    try:
        import rustbpe  # noqa: F401

        rb_code = (
            "import rustbpe; t = rustbpe.Tokenizer(); "
            f"t.train_from_iterator(open({str(corpus)!r}, encoding='utf-8'), 10000)"
        )
        rb_s, _, _ = _run_measured([sys.executable, "-c", rb_code], env=env)
        row.update(rustbpe_s=rb_s, ratio_vs_rustbpe=ours_s / rb_s)
    except Exception:
        row["rustbpe_s"] = None
    results.add(**row)
    benchmark.extra_info.update(row)


def _tiktoken_gpt2(tiktoken):
    """tiktoken's encoder over GPT-2's files (offline: the same ranks and pattern as ours)."""
    from tokenizer.pretokenize import GPT2_PATTERN
    from tokenizer.tokenizer import from_printable

    vocab = json.loads((GPT2 / "gpt2_vocab.json").read_text())
    ranks = {from_printable(k): v for k, v in vocab.items() if k != EOT}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def test_encoding_vs_tiktoken(benchmark, results, quick):
    tiktoken = pytest.importorskip("tiktoken")
    from tokenizer import Tokenizer

    n_bytes = (4 if quick else 23) * 10**6
    with open(CORPUS, "rb") as f:
        text = f.read(n_bytes).decode("utf-8", errors="ignore")
    mb = len(text.encode()) / 1e6
    tok = Tokenizer.from_files(GPT2 / "gpt2_vocab.json", GPT2 / "gpt2_merges.txt", [EOT])
    enc = _tiktoken_gpt2(tiktoken)
    timed = {}

    def ours_encode():
        t = time.perf_counter()
        timed["ids"] = tok.encode(text)
        timed["s"] = time.perf_counter() - t

    benchmark.pedantic(ours_encode, rounds=1, iterations=1)
    ours, ours_s = timed["ids"], timed["s"]
    tok._cache.clear()
    t = time.perf_counter()
    streamed = sum(1 for _ in tok.encode_iterable(text[i : i + 4096] for i in range(0, len(text), 4096)))
    stream_s = time.perf_counter() - t
    t = time.perf_counter()
    ref = enc.encode(text, allowed_special="all")
    tik_s = time.perf_counter() - t
    assert ours == ref and streamed == len(ref)
    row = dict(
        kind="tokenizer_encode",
        corpus=CORPUS.name,
        mb=mb,
        processes=1,
        ours_mb_s=mb / ours_s,
        ours_iterable_mb_s=mb / stream_s,
        tiktoken_mb_s=mb / tik_s,
        ratio_vs_tiktoken=(mb / ours_s) / (mb / tik_s),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    results.add(**row)
    benchmark.extra_info.update(row)


def test_encoding_without_whitespace_vs_tiktoken(benchmark, results, quick):
    """1 MB of random letters and digits (one pretoken per run of a class: base64, minified code):
    BPE on pretokens a megabyte long, where a rescanning merge loop is quadratic."""
    import random
    import string

    tiktoken = pytest.importorskip("tiktoken")
    from tokenizer import Tokenizer

    rng = random.Random(0)
    rows = []
    enc = _tiktoken_gpt2(tiktoken)  # no state across calls: one for both texts
    for name, alphabet in (("letters", string.ascii_letters), ("base64", string.ascii_letters + string.digits + "+/")):
        text = "".join(rng.choice(alphabet) for _ in range(10**6))
        tok = Tokenizer.from_files(GPT2 / "gpt2_vocab.json", GPT2 / "gpt2_merges.txt", [EOT])
        timed = {}

        def ours_encode(text=text, tok=tok, timed=timed):
            t = time.perf_counter()
            timed["ids"] = tok.encode(text)
            timed["s"] = time.perf_counter() - t

        if not rows:
            benchmark.pedantic(ours_encode, rounds=1, iterations=1)
        else:
            ours_encode()
        t = time.perf_counter()
        ref = enc.encode(text)
        tik_s = time.perf_counter() - t
        assert timed["ids"] == ref
        rows.append(
            dict(
                kind="tokenizer_encode_no_whitespace",
                text=name,
                mb=len(text) / 1e6,
                ours_s=timed["s"],
                tiktoken_s=tik_s,
                time_ratio_vs_tiktoken=timed["s"] / tik_s,
            )
        )
    for row in rows:
        results.add(**row)
    benchmark.extra_info.update(rows=rows)


ZIPF_GB = (0.25, 1.0, 4.0)  # the sizes; --bench-quick runs a 16x smaller ladder, BENCH_ZIPF_GB="a,b,c" any


def _zipf_corpus(gb: float) -> Path:
    """The deterministic Zipf corpus of ``gb`` GB (``tokenizer.zipf_corpus``, seed 0), kept across
    runs in ``$BENCH_ZIPF_DIR`` (default ``~/.cache/fastlm/zipf``): the 4 GB one takes minutes to
    write and the same bytes every time."""
    import hashlib

    import tokenizer.zipf_corpus as zc

    root = Path(os.environ.get("BENCH_ZIPF_DIR") or Path.home() / ".cache" / "fastlm" / "zipf")
    root.mkdir(parents=True, exist_ok=True)
    version = hashlib.sha256(Path(zc.__file__).read_bytes()).hexdigest()[:8]  # a changed generator: new files
    path = root / f"zipf_{gb:.6g}gb_seed0_{version}.txt"
    if not path.exists():
        for stale in root.glob(path.name + ".*.tmp"):  # left by an interrupted run
            stale.unlink(missing_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        zc.write_corpus(str(tmp), int(gb * 1e9))
        os.replace(tmp, path)
    return path


def _scaling_row(runs: list, gbs: list[float], read_s: list[float]) -> dict:
    """The ladder's results row from ``runs[round][size]``, lists of (wall, peak, cpu) per run."""
    every = [[run for rr in runs for run in rr[i]] for i in range(len(gbs))]  # per size, all rounds
    mean = [sum(w for w, *_ in rs) / len(rs) for rs in every]
    per_gb = [m / gb for m, gb in zip(mean, gbs)]
    cpu_per_gb = [sum(c for *_, c in rs) / (len(rs) * gb) for rs, gb in zip(every, gbs)]
    round_per_gb = [[sum(w for w, *_ in rr[i]) / (len(rr[i]) * gb) for i, gb in enumerate(gbs)] for rr in runs]
    fastest = [min(w for w, *_ in rs) for rs in every]
    fastest_per_gb = [w / gb for w, gb in zip(fastest, gbs)]
    peaks = [max(p for _, p, _ in rs) for rs in every]  # memory: the largest of any run
    row = dict(
        kind="tokenizer_train_scaling",
        schedule="palindrome",  # each round: every size's runs centred on the largest run
        corpus="zipf_seed0",
        vocab_size=10000,
        workers=1,
        rounds=len(runs),
        runs_per_round=[len(rs) for rs in runs[0]],
        sizes_gb=gbs,
        s_per_gb=per_gb,
        wall_s_mean=mean,
        wall_s_runs=[[w for w, *_ in rs] for rs in every],
        cpu_s_per_gb=cpu_per_gb,
        warm_read_s=read_s,
        peak_mb=peaks,
        s_per_gb_spread=max(per_gb) / min(per_gb),
        s_per_gb_spread_rounds=[max(x) / min(x) for x in round_per_gb],
        cpu_s_per_gb_spread=max(cpu_per_gb) / min(cpu_per_gb),
        wall_s_fastest=fastest,
        s_per_gb_spread_fastest=max(fastest_per_gb) / min(fastest_per_gb),
        peak_ratio_largest_two=peaks[-1] / peaks[-2],
    )
    return row


def _palindrome(repeats: list[int]) -> list[tuple[int, int]]:
    """One round's blocks of runs, (size index, runs), smallest size first: half of each size's runs
    on the way up to the largest, the rest on the way back down (0.25 GB x8, 1 GB x2, 4 GB x1,
    1 GB x2, 0.25 GB x8), so that every size's runs are centred on the same moment of the round."""
    up = [(i, n // 2) for i, n in enumerate(repeats) if n // 2]
    down = [(i, n - n // 2) for i, n in reversed(list(enumerate(repeats)))]
    return up + down


def test_bpe_training_scales_linearly_on_zipf(benchmark, tmp_path_factory, results, quick):
    """Training time per GB and peak memory over corpora 16x apart in size (one worker, vocab
    10,000): the merge loop's cost follows the unique pretokens, which a Zipf tail makes grow far
    slower than the corpus, so time per GB is highest at the smallest size; the goal is a spread within 1.3x and
    peak memory within 1.5x between the two largest. Each corpus is read once before its runs (a
    warm page cache), and CPU seconds are kept beside wall seconds.

    Equal work per size: in each round every size trains on about as many bytes as the largest
    (the 0.25 GB corpus 16 times, the 1 GB one 4 times, the 4 GB one once; with --bench-quick 21
    runs of ~25 s in all), so each size's time per GB is measured over a window as long as the
    largest run's. This host's speed moved 1.7x within an hour; a fastest-of-N over runs of 5 s
    and of 60 s favours the short ones, which catch the fast minutes that a long run averages
    over. Each round runs the sizes as a palindrome about the largest (``_palindrome``), so a
    drift in the host's speed over the round reaches every size alike; the rounds
    (``$BENCH_ZIPF_ROUNDS``, default 2; 1 with --bench-quick) repeat it. The spread is that of
    the summed time per GB over all rounds; each round's spread and each size's fastest single
    run are kept beside it (``wall_s_runs``: every run of a size, in the order run;
    ``warm_read_s``: the last read)."""
    if os.environ.get("BENCH_ZIPF_GB"):
        sizes = tuple(sorted(float(g) for g in os.environ["BENCH_ZIPF_GB"].split(",")))
    else:
        sizes = tuple(gb / 16 for gb in ZIPF_GB) if quick else ZIPF_GB
    assert len(sizes) >= 2, "BENCH_ZIPF_GB needs two sizes or more"
    rounds = int(os.environ.get("BENCH_ZIPF_ROUNDS") or (1 if quick else 2))
    assert rounds >= 1, "BENCH_ZIPF_ROUNDS must be 1 or more"
    corpora = [_zipf_corpus(gb) for gb in sizes]
    gbs = [c.stat().st_size / 1e9 for c in corpora]
    repeats = [max(1, round(max(gbs) / gb)) for gb in gbs]  # runs per size and round: equal bytes
    runs = [[[] for _ in sizes] for _ in range(rounds)]  # per round, per size: (wall, peak, cpu) of each run
    read_s = [0.0] * len(sizes)
    for r in range(rounds):
        for step, (i, n) in enumerate(_palindrome(repeats)):
            read_s[i] = _warm_page_cache(corpora[i])
            train = [sys.executable, "-m", "tokenizer", "train", "--input", str(corpora[i]), "--vocab-size", "10000"]
            train += ["--special-token", EOT, "--workers", "1", "--quiet"]
            for k in range(n):
                cmd = train + ["--out", str(tmp_path_factory.mktemp("zipf"))]
                # The CLI's process-tree peak: with one worker and the compiled core, the trainer's own.
                if r == 0 and step == 0 and k == 0:
                    got = benchmark.pedantic(_run_measured, args=(cmd,), rounds=1, iterations=1)
                else:
                    got = _run_measured(cmd)
                runs[r][i].append(got)
    row = _scaling_row(runs, gbs, read_s)
    results.add(**row)
    benchmark.extra_info.update(row)
