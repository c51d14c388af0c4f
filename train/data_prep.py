"""Turning what the user gave (token files, raw text, or a dataset name) into token arrays.

- Token files (``--train-data``) are memory-mapped as they are.
- Raw text (``--train-text``) trains a BPE of the model's vocab size and encodes train and
  validation text once; the results are cached under ``data_dir`` by a hash of the content and the
  tokenizer settings, so a second run starts immediately.
- A dataset name (``--dataset``) downloads the official files (resumable, with a progress bar and a
  size check), then prepares them like raw text.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from train.data import load_tokens

HF = "https://huggingface.co"
DATASETS: dict[str, dict[str, str]] = {
    "tinystories": {
        "train": f"{HF}/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt",
        "valid": f"{HF}/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
    },
    "owt": {
        "train": f"{HF}/datasets/stanford-cs336/owt-sample/resolve/main/owt_train.txt.gz",
        "valid": f"{HF}/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz",
    },
}


@dataclass
class PreparedData:
    train: np.ndarray
    valid: np.ndarray
    tokenizer_dir: str | None


def download(url: str, dest: Path, progress: bool = True, chunk: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` with an HTTP Range request and
    checking the final size against the server's; the file appears only when complete."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already complete
            part.rename(dest)
            return dest
        raise ConnectionError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(f"cannot reach {url}: {e}") from None
    with resp:
        if have and resp.status != 206:  # server ignored the range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mode = "ab" if have else "wb"
        with (
            open(part, mode) as f,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
        ):
            while True:
                buf = resp.read(chunk)
                if not buf:
                    break
                f.write(buf)
                bar.update(len(buf))
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"download of {url} incomplete: {size} of {total} bytes (run again to resume)")
    part.rename(dest)
    return dest


def _gunzip(src: Path) -> Path:
    out = src.with_suffix("")
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        with gzip.open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        tmp.rename(out)
    return out


def fetch_dataset(
    name: str, data_dir: str | Path, mirror: str | None = None, progress: bool = True
) -> tuple[Path, Path]:
    """Local paths of the dataset's train and valid text, downloading what is missing."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    paths = []
    for split in ("train", "valid"):
        url = DATASETS[name][split]
        if mirror:
            url = mirror.rstrip("/") + url[len(HF) :]
        dest = Path(data_dir) / name / url.rsplit("/", 1)[-1]
        try:
            path = download(url, dest, progress)
        except ConnectionError as e:
            raise ConnectionError(
                f"{e}\nNo network? Download the files elsewhere and pass --train-text/--valid-text, or "
                f"encode them with 'python -m tokenizer' and pass --train-data/--valid-data."
            ) from None
        paths.append(_gunzip(path) if path.suffix == ".gz" else path)
    return paths[0], paths[1]


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file: concurrent runs (array tasks, DDP ranks) prepare a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 22):
            h.update(buf)
    return h.hexdigest()


def prepare_text(
    train_text: str | Path,
    valid_text: str | Path | None,
    vocab_size: int,
    special_token: str,
    data_dir: str | Path,
    progress: bool = True,
    tokenizer=None,
) -> PreparedData:
    """Train a BPE on ``train_text`` (or take ``tokenizer``, a Tokenizer: ``--init-from``'s) and
    encode both texts, cached by content hash."""
    from tokenizer.bpe_train import train_bpe
    from tokenizer.encode import encode_file
    from tokenizer.pretokenize import require_file
    from tokenizer.tokenizer import Tokenizer

    train_text = Path(train_text)
    for p in (train_text, valid_text):
        if p is not None:
            require_file(p, "text file")
    settings = f"{vocab_size}|{special_token}" if tokenizer is None else f"tokenizer {tokenizer.fingerprint()}"
    key = hashlib.sha256(f"{_file_hash(train_text)}|{settings}".encode()).hexdigest()[:16]
    cache = Path(data_dir) / "prepared" / key
    tok_dir = cache / "tokenizer"
    train_bin = cache / "train.bin"
    valid_bin = cache / f"valid-{_file_hash(Path(valid_text))[:16]}.bin" if valid_text is not None else None
    with _locked(cache / ".lock"):
        if not (tok_dir / "vocab.json").exists():
            if tokenizer is None:
                vocab, merges = train_bpe(train_text, vocab_size, [special_token], progress=progress)
                tokenizer = Tokenizer(vocab, merges, [special_token])
            tmp_dir = cache / "tokenizer.tmp"
            tokenizer.save(tmp_dir)
            os.replace(tmp_dir, tok_dir)
        if not train_bin.exists():
            encode_file(tok_dir, train_text, train_bin, progress=progress)
        if valid_bin is not None and not valid_bin.exists():
            encode_file(tok_dir, valid_text, valid_bin, progress=progress)
    if valid_bin is not None:
        return PreparedData(load_tokens(train_bin), load_tokens(valid_bin), str(tok_dir))
    train, valid = split_tail(load_tokens(train_bin))
    return PreparedData(train, valid, str(tok_dir))


def split_tail(tokens: np.ndarray, fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last ``fraction`` of a token array for validation (views, no copy)."""
    n_valid = max(int(len(tokens) * fraction), 1)
    return tokens[:-n_valid], tokens[-n_valid:]


def init_from_tokenizer(run):
    """``--init-from``'s tokenizer (its tokenizer.json as our Tokenizer); the run's special token
    (document separator, stop token) must be one of its special tokens."""
    from train.hf_llama import read_llama_tokenizer

    tok = read_llama_tokenizer(run.init_from)
    if run.special_token not in tok.special_ids:
        raise ValueError(
            f"--special-token {run.special_token!r} is not a special token of {run.init_from}'s tokenizer "
            f"({', '.join(tok.special_tokens) or 'it has none'})"
        )
    return tok


def _saved_tokenizer(tok, data_dir: str | Path) -> Path:
    """A directory holding ``tok`` in our format, cached under ``data_dir`` by its fingerprint."""
    out = Path(data_dir) / "prepared" / f"tokenizer-{tok.fingerprint()}"
    with _locked(out.with_name(out.name + ".lock")):
        if not (out / "vocab.json").exists():
            tok.save(out.with_name(out.name + ".tmp"))
            os.replace(out.with_name(out.name + ".tmp"), out)
    return out


def prepare_data(run, model_cfg, progress: bool = True) -> PreparedData:
    """Resolve a RunConfig's data options into train/valid token arrays."""
    init_tok = init_from_tokenizer(run) if run.init_from else None
    if run.train_data:
        train = load_tokens(run.train_data)
        if run.valid_data:
            valid = load_tokens(run.valid_data)
        else:
            train, valid = split_tail(train)
        tok_dir = run.tokenizer
        if tok_dir is None and init_tok is not None:
            tok_dir = str(_saved_tokenizer(init_tok, run.data_dir))
        if tok_dir is None:
            import json

            sidecar = Path(run.train_data + ".json")
            if sidecar.exists():
                tok_dir = json.loads(sidecar.read_text()).get("tokenizer_dir")
        return PreparedData(train, valid, tok_dir)
    if run.train_text:
        return prepare_text(
            run.train_text, run.valid_text, model_cfg.vocab_size, run.special_token, run.data_dir, progress, init_tok
        )
    if run.dataset:
        train_txt, valid_txt = fetch_dataset(run.dataset, run.data_dir, run.dataset_mirror, progress)
        return prepare_text(
            train_txt, valid_txt, model_cfg.vocab_size, run.special_token, run.data_dir, progress, init_tok
        )
    raise ValueError(
        "no training data: pass --train-data FILE.bin (from 'python -m tokenizer encode'), "
        "--train-text FILE.txt (raw text; a tokenizer is trained and cached), or --dataset tinystories|owt"
    )
