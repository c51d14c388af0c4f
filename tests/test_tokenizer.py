"""BPE trainer and Tokenizer: an independent naive oracle, tiktoken's GPT-2 ids, streaming, files."""

import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import tokenizer.bpe_train as bpe_train
import tokenizer.encode as encode_mod
from tokenizer import Tokenizer, train_bpe
from tokenizer.cli import main as cli_main
from tokenizer.pretokenize import GPT2_PATTERN, PRETOKEN_RE, SpecialFinder

EOT = "<|endoftext|>"
ROOT = Path(__file__).resolve().parents[1]

IMPLS = ["native", "python"]


def python_only(tok: Tokenizer) -> Tokenizer:
    """The same tokenizer with its compiled encoder switched off (the pure-Python path)."""
    tok._encoder_tried, tok._encoder = True, None
    tok._cache.clear()
    return tok


def test_native_core_builds_and_loads():
    from tokenizer import native

    assert native.load() is not None, "the compiled BPE core did not build (see the warning)"


def naive_bpe(text: str, vocab_size: int, specials: list[str]):
    """The handout's algorithm, written the slow obvious way: recount every pair every merge."""
    import regex

    docs = regex.split("|".join(regex.escape(s) for s in specials), text) if specials else [text]
    words = Counter()
    for d in docs:
        for m in PRETOKEN_RE.findall(d):
            words[tuple(bytes([b]) for b in m.encode())] += 1
    merges = []
    while 256 + len(merges) + len(specials) < vocab_size:
        pairs = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += c
        words = new
    return merges


@pytest.mark.parametrize("impl", IMPLS)
def test_trainer_matches_naive_oracle(tmp_path, impl):
    text = (
        "low low low low low lower lower widest widest widest newest newest newest newest newest newest "
        f"{EOT}the cat sat on the mat. the cat's hat!{EOT} ab ab ba ba zz zz 12 123 1234 "
    ) * 3
    path = tmp_path / "c.txt"
    path.write_text(text)
    vocab, merges = train_bpe(path, 300, [EOT], num_workers=1, use_native=impl == "native")
    assert merges == naive_bpe(text, 300, [EOT])
    assert len(vocab) == 256 + len(merges) + 1 and vocab[len(vocab) - 1] == EOT.encode()


@pytest.mark.parametrize("impl", IMPLS)
def test_trainer_on_real_corpus_matches_oracle_and_is_worker_independent(shared_data, tmp_path, monkeypatch, impl):
    text = (shared_data / "corpus.en").read_text()[:20000]
    path = tmp_path / "c.txt"
    path.write_text(text)
    expect = naive_bpe(text, 330, [EOT])
    monkeypatch.setattr(bpe_train, "CHUNK_BYTES", 3000)  # force many chunks
    monkeypatch.setattr(bpe_train, "NATIVE_CHUNK_BYTES", 3000)
    results = [train_bpe(path, 330, [EOT], num_workers=w, use_native=impl == "native") for w in (1, 2, 3)]
    assert results[0][1] == expect
    assert all(r == results[0] for r in results[1:])


def test_special_tokens_never_merge_into_text(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(("aaaa" + EOT) * 50)
    vocab, merges = train_bpe(path, 270, [EOT])
    assert not any(b"<|" in a + b or b"|>" in a + b for a, b in merges)


@pytest.mark.parametrize(
    "setup,exc,msg",
    [
        (lambda p: None, FileNotFoundError, "not found"),
        (lambda p: p.mkdir(), FileNotFoundError, "is a directory, not a file"),
        (lambda p: p.write_text(""), ValueError, "empty"),
        (lambda p: p.write_bytes(b"hello \xff\xfe world"), ValueError, "offset 6"),
    ],
)
def test_trainer_bad_input(tmp_path, setup, exc, msg):
    path = tmp_path / "c.txt"
    setup(path)
    with pytest.raises(exc, match=msg):
        train_bpe(path, 300, [EOT], num_workers=1)


def test_trainer_vocab_too_small(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="below 256"):
        train_bpe(path, 256, [EOT])


@pytest.fixture(scope="module", params=IMPLS)
def gpt2(shared_data, request):
    tok = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT])
    return python_only(tok) if request.param == "python" else tok


@pytest.fixture(scope="module")
def tiktoken_gpt2(shared_data):
    tiktoken = pytest.importorskip("tiktoken")
    from tokenizer.tokenizer import from_printable

    vocab = json.loads((shared_data / "gpt2_vocab.json").read_text())
    ranks = {from_printable(k): v for k, v in vocab.items() if k != EOT}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


UNICODE_SAMPLES = [
    "Héllò hôw are ü? 🙃",
    "こんにちは世界! 你好，世界。",
    "emoji: 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸 and flags",
    "Ünïcödé   spaces\t\ttabs\n\n\nnewlines  \n",
    "numbers 1234567 ١٢٣ and ½ ⅓",
    "contractions: I'm, you're, they've, it's, we'll, he'd, DON'T",
    f"a{EOT}b{EOT}{EOT}c",
    "",
]


def test_exact_tiktoken_ids_on_gpt2(gpt2, tiktoken_gpt2, shared_data):
    texts = UNICODE_SAMPLES + [
        (shared_data / "corpus.en").read_text(),
        (shared_data / "tinystories_sample.txt").read_text(),
        (shared_data / "novels100.txt").open(encoding="utf-8").read(300_000),
    ]
    for text in texts:
        ids = gpt2.encode(text)
        assert ids == tiktoken_gpt2.encode(text, allowed_special="all")
        assert gpt2.decode(ids) == text


@pytest.mark.slow
def test_native_and_python_trainers_agree_on_a_larger_corpus(shared_data, tmp_path):
    path = tmp_path / "n.txt"
    with open(shared_data / "novels100.txt", "rb") as f:
        data = f.read(3 * 2**20)
    path.write_bytes(data[: data.rfind(EOT.encode())])
    assert train_bpe(path, 2000, [EOT], 2, use_native=True) == train_bpe(path, 2000, [EOT], 2, use_native=False)


def test_native_pretokenizer_matches_regex_on_random_unicode():
    import random

    from tokenizer import native

    core = native.load()
    alphabet = list("ab Z9 '\n\t\r sdmtlvre.,!?-") + [
        "\u00a0",
        "\u2003",
        "é",
        "ß",
        "日",
        "١",
        "½",
        "🙃",
        "\u200d",
        "\u3000",
        "\x0b",
        "\x0c",
        "\x85",
        "\u2028",
        "  ",
    ]
    rng = random.Random(0)
    for _ in range(5000):
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        b = t.encode()
        assert [b[x:y].decode() for x, y in core.pretoken_spans(b)] == PRETOKEN_RE.findall(t), repr(t)


def test_overlapping_special_tokens_longest_first(gpt2, shared_data):
    tok = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT, EOT + EOT])
    ids = tok.encode(f"hi{EOT}{EOT}{EOT}")
    double, single = tok.special_ids[EOT + EOT], tok.special_ids[EOT]
    assert ids[-2:] == [double, single]
    assert tok.decode(ids) == f"hi{EOT}{EOT}{EOT}"


def test_encode_iterable_equals_encode_for_any_cut(gpt2, shared_data):
    text = (shared_data / "tinystories_sample.txt").read_text() + " ends  with spaces \n\n  " + UNICODE_SAMPLES[3]
    expect = gpt2.encode(text)
    assert list(gpt2.encode_iterable(text.splitlines(keepends=True))) == expect
    assert list(gpt2.encode_iterable(text[i : i + 4096] for i in range(0, len(text), 4096))) == expect
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), 30))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert list(gpt2.encode_iterable(pieces)) == expect
    # Cut inside a special token, inside something that only looks like one, and inside
    # contractions (a lone "'" becomes "'ll" only when both l's have arrived).
    for t in ("x <|endoftext|> y", "x <|endoftex y <|end", "It'll be, they've we're I'd 'l'v '  \n\n x"):
        for c in range(1, len(t)):
            assert list(gpt2.encode_iterable([t[:c], t[c:]])) == gpt2.encode(t), (t, c)


def test_encode_iterable_streams_a_file(gpt2, shared_data):
    path = shared_data / "corpus.en"
    with open(path, encoding="utf-8") as f:
        streamed = list(gpt2.encode_iterable(f))
    assert streamed == gpt2.encode(path.read_text())


def test_decode_malformed_and_bad_ids(gpt2):
    # A lone continuation byte (from the byte-level vocab) decodes to U+FFFD.
    cont = gpt2.byte_to_id[b"\x80"]
    assert gpt2.decode([gpt2.encode("a")[0], cont]) == "a\ufffd"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        gpt2.decode([10**7])


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(("héllo wörld 🙃 " * 20 + EOT) * 5)
    vocab, merges = train_bpe(path, 290, [EOT])
    tok = Tokenizer(vocab, merges, [EOT])
    tok.save(tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == [EOT]
    text = "héllo 🙃 wörld" + EOT + "new"
    assert back.encode(text) == tok.encode(text) and back.decode(back.encode(text)) == text
    assert back.fingerprint() == tok.fingerprint()
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing")


def test_printable_alphabet_round_trips_every_byte_and_refuses_the_rest():
    """vocab.json/merges.txt spell bytes in GPT-2's alphabet: every byte string round-trips, and
    a character outside it (a raw space or control char, which GPT-2 remaps, or anything past the
    alphabet) is refused by name rather than passed through as its own code point."""
    from tokenizer.tokenizer import bytes_to_unicode, from_printable, to_printable

    every = bytes(range(256))
    assert to_printable(every) == "".join(bytes_to_unicode()[b] for b in every)
    assert from_printable(to_printable(every)) == every and to_printable(b"") == "" == from_printable("").decode()
    assert to_printable(b" hi\n") == "Ġhi" + "Ċ"
    for bad in (" ", "a\nb", "\x00", "\xad", "ok\uffff", "é😀", "\ud800"):
        first = next(c for c in bad if c not in bytes_to_unicode().values())
        with pytest.raises(ValueError, match=re.escape(repr(first))):
            from_printable(bad)


def test_quiet_training_loads_no_progress_bar_or_process_pool(tmp_path):
    """A quiet run (scripts, Slurm jobs) skips importing tqdm and the process pool: about 0.1 s
    of start-up, a fair part of training a small corpus."""
    path = tmp_path / "c.txt"
    path.write_text("low lower lowest " * 50)
    code = (
        "import sys; from tokenizer import train_bpe; "
        f"train_bpe({str(path)!r}, 270, [], num_workers=1); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tqdm' or m == 'concurrent.futures.process'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_handout_worked_example():
    # The handout's example: "low low low low low lower lower widest widest widest newest x6",
    # whose first merges are (s,t), (e,st), (o,w), (l,ow), (w,est), (n,e).
    text = "low low low low low lower lower widest widest widest newest newest newest newest newest newest"
    # The handout splits on whitespace; with GPT-2 pretokens the leading spaces form part of words.
    merges = naive_bpe(text.replace(" ", "\n"), 256 + 6, [])
    assert merges[:2] == [(b"s", b"t"), (b"e", b"st")]


def test_cli_train_and_encode_identical_across_workers(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setattr(encode_mod, "CHUNK_BYTES", 20_000)
    tok_dir = tmp_path / "tok"
    assert (
        cli_main(
            [
                "train",
                "--input",
                str(shared_data / "corpus.en"),
                "--vocab-size",
                "400",
                "--special-token",
                EOT,
                "--out",
                str(tok_dir),
                "--workers",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tok_dir / "meta.json").read_text())["vocab_size"] == 400
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "tinystories_sample.txt").read_text() * 20)
    outs = []
    for w in (1, 2):
        out = tmp_path / f"ids{w}.bin"
        assert (
            cli_main(
                [
                    "encode",
                    "--tokenizer",
                    str(tok_dir),
                    "--input",
                    str(corpus),
                    "--out",
                    str(out),
                    "--workers",
                    str(w),
                    "--quiet",
                ]
            )
            == 0
        )
        outs.append(out.read_bytes())
        assert " tokens (uint16) from " in capsys.readouterr().out  # the dtype by name, not "<u2"
    assert outs[0] == outs[1]
    meta = json.loads((tmp_path / "ids1.bin.json").read_text())
    ids = np.fromfile(tmp_path / "ids1.bin", dtype=meta["dtype"])
    tok = Tokenizer.load(tok_dir)
    assert meta["tokens"] == len(ids) and ids.tolist() == tok.encode(corpus.read_text())
    assert meta["tokenizer_hash"] == tok.fingerprint()


def test_encode_to_a_missing_directory_writes_nothing(tmp_path, shared_data):
    from tokenizer.encode import encode_file

    tok = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT])
    tok.save(tmp_path / "tok")
    with pytest.raises(FileNotFoundError, match="output directory"):
        encode_file(tmp_path / "tok", shared_data / "tinystories_sample.txt", tmp_path / "no" / "x.bin", progress=False)
    assert not (tmp_path / "no").exists()


def test_cli_errors(tmp_path, capsys):
    assert (
        cli_main(
            [
                "train",
                "--input",
                str(tmp_path / "nope.txt"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "o"),
                "--quiet",
            ]
        )
        == 1
    )
    assert "not found" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hi")
    assert (
        cli_main(
            [
                "encode",
                "--tokenizer",
                str(tmp_path / "none"),
                "--input",
                str(tmp_path / "t.txt"),
                "--out",
                str(tmp_path / "o.bin"),
                "--quiet",
            ]
        )
        == 1
    )


@pytest.mark.parametrize("bad, msg", [([""], "is empty"), (["<|a|>", "<|a|>"], "more than once")])
def test_bad_special_tokens_refused(tmp_path, bad, msg):
    from tokenizer import validate_special_tokens

    with pytest.raises(ValueError, match=msg):
        validate_special_tokens(bad)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world " * 10)
    with pytest.raises(ValueError, match=msg):
        train_bpe(corpus, 300, bad)
    with pytest.raises(ValueError, match=msg):
        Tokenizer({i: bytes([i]) for i in range(256)}, [], bad)
    args = ["train", "--input", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "o"), "--quiet"]
    for s in bad:
        args += ["--special-token", s]
    assert cli_main(args) == 1


def _long_strings(seed: int = 0) -> list[str]:
    """Whitespace-free strings whose pretokens run to thousands of bytes (where BPE was quadratic)."""
    import string

    rng = random.Random(seed)
    alphabets = [string.ascii_letters, "ab", "a", string.digits, string.punctuation, "éüßж中文", "🙃👍"]
    return ["".join(rng.choice(a) for _ in range(n)) for n in (40, 300, 5000) for a in alphabets] + [
        "".join(rng.choice(string.ascii_letters + string.digits + "+/=") for _ in range(60_000))  # base64-like
    ]


def test_long_whitespace_free_strings_match_tiktoken(gpt2, tiktoken_gpt2):
    for text in _long_strings():
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all"), text[:40]


def test_long_heap_merge_equals_rescanning_loop(gpt2):
    for text in _long_strings(2)[:14]:  # up to 300 characters: the oracle is quadratic
        ids = [gpt2._byte_ids[x] for x in text.encode()]
        slow = list(ids)
        while len(slow) > 1:
            cands = [(gpt2._ranks[p], i) for i, p in enumerate(zip(slow, slow[1:])) if p in gpt2._ranks]
            if not cands:
                break
            (_, ab), i = min(cands, key=lambda c: (c[0][0], c[1]))
            slow[i : i + 2] = [ab]
        assert gpt2._merge_long(list(ids)) == slow


def test_encode_iterable_random_cuts_of_long_strings(gpt2):
    rng = random.Random(3)
    text = "x" * 3000 + " " + "".join(_long_strings(4)[14:18]) + f"{EOT}ab'll" + "9" * 2000
    want = gpt2.encode(text)
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), 40))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert list(gpt2.encode_iterable(pieces)) == want
    assert list(gpt2.encode_iterable(iter(text))) == want  # one character at a time


def test_lone_surrogates_replaced_like_tiktoken(gpt2, tiktoken_gpt2):
    texts = ["a\ud800b", "\udfff", "x \ud83d\ude00 y", "end\ud83d", "\ud83d" * 3 + "z"]
    for text in texts:
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text), ascii(text)
    pieces = ["x \ud83d", "\ude00 y\ud800", "", "q"]
    assert list(gpt2.encode_iterable(pieces)) == gpt2.encode("".join(pieces))


def test_encoder_caches_give_the_same_ids_cold_and_warm(shared_data, tiktoken_gpt2):
    """Thousands of distinct pretokens of 1-24 bytes (the flat cache holds <= 16 bytes and <= 3 ids,
    longer ones go to the map), NUL and multi-byte characters inside keys, enough to grow the flat
    table several times: first pass all misses, second all hits, both tiktoken's ids; the uint32
    array form agrees."""
    tok = Tokenizer.from_files(shared_data / "gpt2_vocab.json", shared_data / "gpt2_merges.txt", [EOT])
    rng = random.Random(7)
    alphabet = list("abcdefghijklmnopqrstuvwxyzQX") + ["\x00", "é", "日", "🙃", "\x7f"]
    words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))) for _ in range(20_000)]
    text = " ".join(words) + f"{EOT}tail " + " ".join(words[:500])
    want = tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode(text) == want
    assert tok._native_encoder().cache_size() > 4096  # grown past its first table
    assert tok.encode(text) == want
    assert tok.encode_array(text).tolist() == want
    assert python_only(tok).encode(text) == want


@pytest.mark.parametrize("special", [EOT, "aa", "a", "aba"])
def test_single_special_split_equals_the_pattern(special):
    """One special token splits with str.split: the same parts as the longest-first pattern,
    overlapping candidates ("aaa" with "aa", "ababa" with "aba") included."""
    import regex

    from tokenizer.pretokenize import special_splitter, split_on_specials

    fast, pattern = special_splitter([special]), regex.compile("(" + regex.escape(special) + ")")
    rng = random.Random(5)
    for _ in range(2000):
        text = "".join(rng.choice(["a", "b", special, "<|", "|>", " "]) for _ in range(rng.randint(0, 20)))
        assert split_on_specials(text, fast) == pattern.split(text), text


def test_native_merges_match_the_oracle_on_repetitive_random_text(tmp_path):
    """Small alphabets make overlapping occurrences ("aaaa", "abab", "cc" next to a merged "cc"),
    where only the merged occurrences' neighbours change count: the native loop's local updates
    and lazy heap against the oracle that recounts everything."""
    rng = random.Random(11)
    for trial in range(25):
        alphabet = rng.choice(["ab ", "abc \n", "a b", "aab  "])
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400)))
        path = tmp_path / f"r{trial}.txt"
        path.write_text(text)
        _, merges = train_bpe(path, 256 + 40, [], num_workers=1, use_native=True)
        assert merges == naive_bpe(text, 256 + 40, []), text


def test_native_merges_leave_out_rare_pairs_and_recount_when_the_bound_is_wrong(shared_data):
    """New pairs under the rarity bound are left out of the merge loop's table; the merges must not
    change with the bound's scale: 0 keeps every pair, the default leaves most out without a
    recount, and an absurd scale leaves out pairs that later are the best (and runs out of kept
    pairs), which the fallback recount must catch, on real text and on small-alphabet text."""
    from tokenizer import native

    core = native.load()
    text = (shared_data / "corpus.en").read_text()[:200000]
    counts = Counter(m.encode() for part in text.split(EOT) for m in PRETOKEN_RE.findall(part))
    words, freqs = list(counts), list(counts.values())
    full = core.merge(words, freqs, 1200, prune=0)
    stats = {}
    assert core.merge(words, freqs, 1200, stats=stats) == full
    assert stats["pairs_left_out"] > 100 and stats["recounts"] == 0, stats
    stats = {}
    assert core.merge(words, freqs, 1200, prune=1000, stats=stats) == full
    assert stats["pairs_left_out"] > 0 and stats["recounts"] == 1, stats
    everything = core.merge(words, freqs, 10**6, prune=0)  # until no pair is left
    stats = {}  # asked for one more merge than there are: the kept pairs run out first
    assert core.merge(words, freqs, len(everything) + 1, prune=1000, stats=stats) == everything
    assert stats["pairs_left_out"] > 0 and stats["recounts"] == 1, stats
    stats = {}  # (b, c) merged, (a, bc) left out, (a, b) gone: the heap empties with a pair left out
    assert core.merge([b"abc"], [1], 2, prune=1000, stats=stats) == [(b"b", b"c"), (b"a", b"bc")]
    assert stats == {"pairs_left_out": 1, "recounts": 1, "symbol_bits": 16}
    rng = random.Random(3)
    for _ in range(10):
        small = "".join(rng.choice("aab c") for _ in range(rng.randint(100, 400)))
        c = Counter(m.encode() for m in PRETOKEN_RE.findall(small))
        expect = naive_bpe(small, 256 + 30, [])
        for scale in (0, 0.25, 3, 1000):
            assert core.merge(list(c), list(c.values()), 30, prune=scale) == expect, (small, scale)
    stats = {}  # a scale so large the bound overflows int64: everything left out, then one recount
    assert core.merge(words, freqs, 1200, prune=1e300, stats=stats) == full and stats["recounts"] == 1, stats
    for bad in (-1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="prune"):
            core.merge(words, freqs, 10, prune=bad)


def test_native_merges_are_the_same_with_16_and_32_bit_symbols(tmp_path, shared_data):
    """The merge loop keeps its words in 16-bit symbols where every token id and word fits (0.6x
    the memory of 32-bit ones) and in 32-bit ones otherwise: both give the same merges; a word over
    65,535 bytes, or more merges than 16 bits can number, picks 32 bits, and asking for 16 then is refused."""
    from tokenizer import native

    core = native.load()
    text = (shared_data / "corpus.en").read_text()[:100000]
    counts = Counter(m.encode() for part in text.split(EOT) for m in PRETOKEN_RE.findall(part))
    words, freqs = list(counts), list(counts.values())
    for prune in (0, 0.25):
        narrow, wide = {}, {}
        merges = core.merge(words, freqs, 800, prune=prune, stats=narrow)
        assert merges == core.merge(words, freqs, 800, prune=prune, stats=wide, symbol_bits=32)
        assert (narrow["symbol_bits"], wide["symbol_bits"]) == (16, 32)
    stats = {}
    everything = core.merge(words, freqs, 70000, stats=stats)  # runs out of pairs long before
    assert stats["symbol_bits"] == 32 and len(everything) < 65279
    assert core.merge(words, freqs, len(everything), symbol_bits=16) == everything
    with pytest.raises(ValueError, match="16-bit"):
        core.merge(words, freqs, 70000, symbol_bits=16)
    rng = random.Random(7)  # one word of 70,000 letters, from the file, against the oracle
    long_text = "the cat sat on a mat " + "".join(rng.choice("ab") for _ in range(70000)) + " a cat"
    path = tmp_path / "long.txt"
    path.write_text(long_text)
    _, merges = train_bpe(path, 256 + 20, [], num_workers=1)
    assert merges == naive_bpe(long_text, 256 + 20, [])
    stats = {}
    pieces = [m.encode() for m in PRETOKEN_RE.findall(long_text)]
    core.merge(pieces, [1] * len(pieces), 20, stats=stats)
    assert stats["symbol_bits"] == 32
    with pytest.raises(ValueError, match="16-bit"):
        core.merge([long_text.encode()], [1], 20, symbol_bits=16)
    with pytest.raises(ValueError, match="symbol_bits"):
        core.merge(words, freqs, 10, symbol_bits=8)


def test_native_pair_scan_matches_the_scalar_loop():
    """The merge loop finds a pair in a word 16 bytes at a time (SSE2), reading past the word's
    end: against a plain Python scan and the scalar loop (what builds without SSE2 run), over every
    length up to 40, pairs at the edges and beyond the end, a == b, and ids that differ from the
    pair's in one bit, low or high. The symbols end just before an unreadable page, past the room
    the merge loop leaves: a longer read kills the test."""
    import platform

    from tokenizer import native

    core = native.load()
    if platform.machine() in ("x86_64", "AMD64"):
        assert core.pair_scan == "sse2"

    def expect(syms, n, a, b):
        return next((j for j in range(n - 1) if syms[j] == a and syms[j + 1] == b), n)

    rng = random.Random(3)
    cases = 0
    for bits in (16, 32):
        big = (1 << bits) - 1
        for n in range(41):
            for _ in range(25):
                a, b = rng.choice([(1, 2), (5, 5), (big, 0), (0x1234, 0x1235)])
                alphabet = [a, b, a ^ 0x100, b ^ 1, a ^ (big + 1 >> 1), b ^ (big + 1 >> 1), 7]
                if bits == 32:
                    alphabet += [a ^ 0x10000, b ^ 0x10000]
                syms = [rng.choice(alphabet) for _ in range(n + rng.randrange(0, 20))]
                got = core.find_pair_check(syms, n, a, b, bits)
                assert got == (expect(syms, n, a, b),) * 2, (bits, n, a, b, syms)
                cases += 1
            if n >= 2:  # the only occurrence: at the end, then just past it
                syms = [7] * (n - 2) + [1, 2] + [1, 2]
                assert core.find_pair_check(syms, n, 1, 2, bits) == (n - 2, n - 2)
                assert core.find_pair_check(syms, n - 1, 1, 2, bits) == (n - 1, n - 1)
    assert cases == 2 * 41 * 25
    with pytest.raises(ValueError, match="bits"):
        core.find_pair_check([1, 2], 2, 1, 2, 8)
    with pytest.raises(ValueError, match="past"):
        core.find_pair_check([1, 2], 3, 1, 2, 16)
    with pytest.raises(ValueError, match="fit"):
        core.find_pair_check([1, 70000], 2, 1, 2, 16)


def test_native_counter_and_merge_progress(tmp_path):
    from tokenizer import native

    core = native.load()
    text = ("the cat sat on the mat " * 50 + f"{EOT}<|pad|>a{EOT}").encode()
    counter = core.PretokenCounter()
    finder = SpecialFinder([EOT, "<|pad|>"])
    counter.add_text(text, [(a, b) for a, b, _ in finder.spans(text)])
    counts = counter.to_dict()
    assert counts[b" cat"] == 50 and b"<|pad|>" not in counts and EOT.encode() not in counts
    assert counts == Counter(
        m.encode() for part in text.decode().split(EOT) for m in PRETOKEN_RE.findall(part.replace("<|pad|>", ""))
    )
    seen = []
    merges = core.merge_counts(counter, 10, seen.append)
    assert len(merges) == 10 and seen == list(range(1, 11))  # every 0.5% of the merges: each one here
    assert merges == core.merge(list(counts), list(counts.values()), 10)  # the list form agrees
    assert len(counter) == len(counts)  # not consumed unless asked
    ran_out = []
    assert len(core.merge_counts(counter, 1000, ran_out.append)) == 12 == ran_out[-1]  # the bar completes

    def boom(done):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # raised in the callback: leaves the native loop cleanly
        core.merge_counts(counter, 20, boom)
    core.merge_counts(counter, 20, None, consume=True)
    assert len(counter) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_cli_train_shows_pretokenize_and_merge_progress(tmp_path, shared_data, capsys, monkeypatch, impl):
    """Both phases report progress on stderr: bytes pretokenized, then merges done (the native
    merge loop reports through a callback), each bar reaching its total."""
    if impl == "python":
        monkeypatch.setenv("FASTLM_NATIVE", "0")
        monkeypatch.setattr(bpe_train.native, "_tried", True)
        monkeypatch.setattr(bpe_train.native, "_module", None)
    args = ["train", "--input", str(shared_data / "corpus.en"), "--vocab-size", "300", "--out", str(tmp_path / "t")]
    assert cli_main([*args, "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "pretokenize" in err and "100%" in err
    assert "merges" in err and "44/44" in err


def test_cli_first_run_compiles_before_the_clock_and_reports_no_compiler_as_a_worker(tmp_path, shared_data):
    """A fresh machine's first ``train`` builds the core: the compiler is a child process, and its
    peak memory (hundreds of MB) was reported as "largest worker process" and counted by the
    benchmark as worker memory. The core is now built before the work is measured."""
    env = {**os.environ, "FASTLM_CACHE": str(tmp_path / "cache")}  # empty: this run compiles
    args = ["--input", str(shared_data / "corpus.en"), "--vocab-size", "300", "--quiet"]
    r = subprocess.run(
        [sys.executable, "-m", "tokenizer", "train", *args, "--out", str(tmp_path / "t"), "--workers", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert list((tmp_path / "cache").glob("fastlm_bpe_core-*")), "the run should have built the core"
    assert "worker" not in r.stdout.split("peak memory:")[1].splitlines()[0], r.stdout
    assert json.loads((tmp_path / "t" / "meta.json").read_text())["peak_rss_mb_largest_worker"] == 0


def test_cli_train_ctrl_c_exits_130_with_a_message(tmp_path, shared_data, capsys, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(bpe_train, "train_bpe", interrupted)
    out = tmp_path / "t"
    assert (
        cli_main(["train", "--input", str(shared_data / "corpus.en"), "--vocab-size", "300", "--out", str(out)]) == 130
    )
    assert calls and "training stopped by SIGINT: nothing written" in capsys.readouterr().err
    assert not any(out.iterdir())


def test_progress_bars_write_a_line_every_30_s_without_a_terminal(tmp_path):
    """In a log (no terminal) a bar is redrawn every 30 s, not dozens of times a second; its final
    state is still written when it closes."""
    import io

    from tokenizer.progress import progress_bar

    log = io.StringIO()  # not a terminal
    bar = progress_bar(True, total=1000, desc="merges", file=log)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert bar.mininterval == 30 and log.getvalue().count("merges") <= 3
    assert "1000/1000" in log.getvalue()
