"""GPT-2 pretokenization, special-token splitting and special-token-aligned file chunks."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import regex

# GPT-2's pretokenization pattern (the handout's PAT).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)


class NotUTF8Error(ValueError):
    pass


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it is a file; else FileNotFoundError saying whether it is missing or a
    directory (the message a user would otherwise read as "not found" for a path that exists)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} is a directory, not a file: {p}" if p.is_dir() else f"{what} not found: {p}")
    return p


def require_dir(path: str | os.PathLike, what: str, may_be_missing: bool = False) -> Path:
    """``path`` as a Path if it is a directory (or, with ``may_be_missing``, does not exist yet: an
    output to create); else FileNotFoundError saying missing or a file."""
    p = Path(path)
    if not p.is_dir() and not (may_be_missing and not p.exists()):
        raise FileNotFoundError(f"{what} is a file, not a directory: {p}" if p.exists() else f"{what} not found: {p}")
    return p


def read_text(path: str | os.PathLike, start: int, end: int) -> str:
    """The UTF-8 text in bytes [start, end) of a file; invalid bytes stop with their file offset."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUTF8Error(
            f"{path}: bytes at offset {start + e.start} are not valid UTF-8 ({e.reason}); "
            "fix or re-encode the file (e.g. iconv -f latin1 -t utf-8)"
        ) from None


class _OneSpecial:
    """The splitter for a single special token: ``str.split`` (a memchr-speed scan, several times
    faster than the pattern on long texts) re-interleaved with the token. Both take the leftmost
    non-overlapping occurrences, so the parts are the pattern's."""

    def __init__(self, token: str):
        self.token = token

    def split(self, text: str) -> list[str]:
        pieces = text.split(self.token)
        if len(pieces) == 1:
            return pieces
        out = [self.token] * (2 * len(pieces) - 1)
        out[::2] = pieces
        return out


def read_bytes(path: str | os.PathLike, start: int, end: int) -> bytes:
    """``read_text`` as the UTF-8 bytes themselves (validated the same way, same message)."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        read_text(path, start, end)  # raises NotUTF8Error with the offset
    return raw


class SpecialFinder:
    """Where special tokens occur in UTF-8 bytes: (start, end, token bytes), longest first, left to
    right, the same matches ``special_splitter`` makes in the text (UTF-8 is self-synchronising:
    a token's bytes match in the text's bytes exactly where the token matches in the text)."""

    def __init__(self, special_tokens: Iterable[str]):
        self.tokens = sorted({s.encode("utf-8") for s in special_tokens}, key=len, reverse=True)
        self._pattern = regex.compile(b"|".join(regex.escape(t) for t in self.tokens)) if len(self.tokens) > 1 else None

    def spans(self, raw: bytes) -> list[tuple[int, int, bytes]]:
        if not self.tokens:
            return []
        if self._pattern is not None:
            return [(m.start(), m.end(), m.group()) for m in self._pattern.finditer(raw)]
        tok = self.tokens[0]  # one token: bytes.find, several times the pattern's speed
        spans, i = [], raw.find(tok)
        while i >= 0:
            spans.append((i, i + len(tok), tok))
            i = raw.find(tok, i + len(tok))
        return spans


def special_splitter(special_tokens: Iterable[str]) -> regex.Pattern | _OneSpecial | None:
    """A pattern that matches any special token, longest first (so "<|eot|><|eot|>" wins over "<|eot|>")."""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    if not specials:
        return None
    if len(specials) == 1:
        return _OneSpecial(specials[0])
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")")


def split_on_specials(text: str, splitter: regex.Pattern | _OneSpecial | None) -> list[str]:
    """Alternating [text, special, text, special, ..., text]: odd positions are special tokens."""
    if splitter is None:
        return [text]
    return splitter.split(text)


def boundary_token(special_tokens: Iterable[str]) -> bytes | None:
    """The special token file pieces are cut at (the longest, the least likely inside other text)."""
    specials = list(special_tokens)
    return max(specials, key=len).encode("utf-8") if specials else None


def chunk_boundaries(path: str | os.PathLike, target_chunk_bytes: int, split_token: bytes | None) -> list[int]:
    """Byte offsets cutting the file into pieces of about ``target_chunk_bytes``, each cut placed at
    the start of an occurrence of ``split_token`` so no document (and no pretoken) straddles a cut.
    Without a split token (or where none is found) pieces grow until one is."""
    size = os.path.getsize(path)
    if not split_token or size <= target_chunk_bytes:
        return [0, size]
    bounds = [0]
    block = 1 << 20
    with open(path, "rb") as f:
        pos = target_chunk_bytes
        while pos < size:
            f.seek(pos)
            found = -1
            scan = pos
            carry = b""
            while scan < size:
                buf = f.read(block)
                if not buf:
                    break
                data = carry + buf
                idx = data.find(split_token)
                if idx >= 0:
                    found = scan - len(carry) + idx
                    break
                carry = data[-(len(split_token) - 1) :] if len(split_token) > 1 else b""
                scan += len(buf)
            if found < 0:
                break
            if found > bounds[-1]:
                bounds.append(found)
            pos = max(found + 1, bounds[-1] + target_chunk_bytes)
    bounds.append(size)
    return bounds
