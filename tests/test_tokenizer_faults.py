"""The tokenizer on bad conditions: memory limits, damaged files, signals during a parallel encode."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenizer import Tokenizer, train_bpe
from tokenizer.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"

# Encodes the same text under a sweep of address-space limits in one process: each time the
# right ids or MemoryError, and the process carries on to the next limit (and exits 0).
AS_SWEEP = r"""
import random, resource, string, sys
from tokenizer import Tokenizer
data, impl, limits = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
tok = Tokenizer.from_files(data + "/gpt2_vocab.json", data + "/gpt2_merges.txt", ["<|endoftext|>"])
rng = random.Random(0)
words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(1, 9))) for _ in range(3000)]
text = " ".join(rng.choice(words) for _ in range(100_000)) + "<|endoftext|>"
text += "".join(rng.choice(string.ascii_letters) for _ in range(200_000))  # one 200 KB pretoken
tok._encoder_tried = impl == "python"
want = tok.encode(text)
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
def vm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
for extra_mb in limits:
    tok._encoder_tried, tok._encoder, tok._cache = impl == "python", None, {}
    tok._native_encoder()  # a cold encoder (empty cache) each time
    resource.setrlimit(resource.RLIMIT_AS, (vm() + extra_mb * 2**20, hard))
    try:
        result = "ok" if tok.encode(text) == want else "WRONG"
    except MemoryError:
        result = "memoryerror"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    print(extra_mb, result, flush=True)
"""


@pytest.mark.parametrize("impl", ["native", "python"])
def test_encode_under_address_space_limits_gives_ids_or_memoryerror(shared_data, impl):
    limits = list(range(0, 40, 2)) + [48, 64, 96, 160, 256] if impl == "native" else [0, 4, 8, 16, 32, 256]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(
        [sys.executable, "-c", AS_SWEEP, str(shared_data), impl, ",".join(map(str, limits))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    results = dict(line.split() for line in r.stdout.splitlines())
    assert set(results) == {str(x) for x in limits}, r.stdout
    assert set(results.values()) <= {"ok", "memoryerror"}, r.stdout
    assert results["0"] == "memoryerror" and results["256"] == "ok", r.stdout  # the sweep spans both


@pytest.fixture
def saved(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("the cat sat on the mat. " * 50 + EOT) * 20)
    vocab, merges = train_bpe(corpus, 300, [EOT])
    tok = Tokenizer(vocab, merges, [EOT])
    return tok, tok.save(tmp_path / "tok")


def _truncate_at_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))


def _add_special_token(d: Path) -> None:
    (d / "special_tokens.json").write_text(json.dumps([EOT, "<|pad|>"]))


@pytest.mark.parametrize(
    "damage, exc, msg",
    [
        (
            lambda d: _truncate_at_line(d / "merges.txt"),
            ValueError,
            r"merges.txt is damaged: \d+ bytes.*\(truncated\?\)",
        ),
        (
            _add_special_token,
            ValueError,
            r"special_tokens.json is damaged: \d+ bytes.*\(edited or appended to\?\).*Tokenizer.from_files",
        ),
        (lambda d: (d / "special_tokens.json").unlink(), FileNotFoundError, r"special_tokens.json is missing"),
        (lambda d: (d / "vocab.json").write_text((d / "vocab.json").read_text()[:100]), ValueError, "vocab.json"),
        (
            lambda d: (d / "merges.txt").write_text((d / "merges.txt").read_text().replace("t h", "h t", 1)),
            ValueError,
            r"merges.txt is damaged: its sha256",
        ),
        (lambda d: (d / "vocab.json").unlink(), FileNotFoundError, r"vocab.json is missing"),
        (lambda d: (d / "meta.json").write_text("{"), ValueError, r"meta.json: not valid JSON"),
    ],
)
def test_damaged_files_are_named(saved, damage, exc, msg):
    tok, d = saved
    assert Tokenizer.load(d).encode("the cat") == tok.encode("the cat")
    damage(d)
    with pytest.raises(exc, match=msg):
        Tokenizer.load(d)


def test_a_meant_edit_loads_once_saved_again(saved):
    """What the damaged-file message advises for a deliberate edit: from_files, then save."""
    tok, d = saved
    _add_special_token(d)
    with pytest.raises(ValueError, match="edited or appended to"):
        Tokenizer.load(d)
    specials = json.loads((d / "special_tokens.json").read_text())
    Tokenizer.from_files(d / "vocab.json", d / "merges.txt", specials).save(d)
    again = Tokenizer.load(d)
    assert again.special_tokens == [EOT, "<|pad|>"]
    pad = len(tok.vocab)
    assert again.encode("the cat<|pad|>") == tok.encode("the cat") + [pad]


@pytest.mark.parametrize(
    "damage, msg",
    [
        (lambda d: (d / "vocab.json").write_text((d / "vocab.json").read_text()[:100]), r"vocab.json: not valid JSON"),
        (
            lambda d: (d / "special_tokens.json").write_text('["", "x"]'),
            r"special_tokens.json: special token #0 is empty",
        ),
        (lambda d: (d / "merges.txt").write_text("#version: 0.2\na b c\n"), r"merges.txt:2: expected two tokens"),
    ],
)
def test_damaged_files_without_meta_still_named(saved, damage, msg):
    """Without meta.json (GPT-2's own files) the parse errors still name the file."""
    tok, d = saved
    (d / "meta.json").unlink()
    assert Tokenizer.load(d).encode("the cat") == tok.encode("the cat")
    damage(d)
    with pytest.raises(ValueError, match=msg):
        Tokenizer.load(d)


def test_gpt2_files_without_meta_load(shared_data, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (d / name).write_bytes((shared_data / f"gpt2_{name}").read_bytes())
    assert len(Tokenizer.load(d)) == 50257


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[1][0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_parallel_encode_stops_workers_and_removes_temp(saved, tmp_path, shared_data, sig):
    _, d = saved
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        piece = (shared_data / "tinystories_sample.txt").read_text()
        while f.tell() < 40 * 2**20:
            f.write(piece)
    out = tmp_path / "ids.bin"
    cmd = [sys.executable, "-m", "tokenizer", "encode", "--tokenizer", str(d), "--input", str(big)]
    cmd += ["--out", str(out), "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    tmp = out.with_name(out.name + ".tmp")
    deadline = time.monotonic() + 120
    children: list[int] = []
    while time.monotonic() < deadline and not (tmp.exists() and len(children) >= 2):
        time.sleep(0.05)
        kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        children = [int(x) for x in kids.read_text().split()] if kids.exists() else []
    assert tmp.exists() and len(children) >= 2, "encode did not start its workers"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {sig.name}" in err and "workers stopped" in err
    assert not tmp.exists() and not out.exists()
    assert not any(_alive(pid) for pid in children)


def test_cli_names_damaged_tokenizer(saved, tmp_path, capsys):
    _, d = saved
    (d / "special_tokens.json").unlink()
    src = tmp_path / "in.txt"
    src.write_text("hello")
    assert cli_main(["encode", "--tokenizer", str(d), "--input", str(src), "--out", str(tmp_path / "o.bin")]) == 1
    assert "special_tokens.json is missing" in capsys.readouterr().err
    assert json.loads((d / "meta.json").read_text())["files"]


def test_cli_paths_of_the_wrong_kind_are_named_before_any_work(saved, tmp_path, capsys):
    """A file where a directory is expected, or the reverse: one line saying which, not a
    traceback, and an encode whose output is a directory refuses before encoding anything."""
    _, d = saved
    src = tmp_path / "in.txt"
    src.write_text("hello world " * 100)
    a_file, a_dir = tmp_path / "a_file", tmp_path / "a_dir"
    a_file.write_text("x")
    a_dir.mkdir()
    cases = [
        (["train", "--input", str(src), "--vocab-size", "260", "--out", str(a_file)], "--out is a file"),
        (["train", "--input", str(a_dir), "--vocab-size", "260", "--out", str(tmp_path / "t")], "is a directory"),
        (["encode", "--tokenizer", str(d), "--input", str(src), "--out", str(a_dir)], "output is a directory"),
        (["encode", "--tokenizer", str(d / "vocab.json"), "--input", str(src), "--out", "o.bin"], "is a file, not"),
    ]
    for argv, msg in cases:
        assert cli_main([*argv, "--quiet"]) == 1, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in a_dir.iterdir()) == [] and a_file.read_text() == "x"
