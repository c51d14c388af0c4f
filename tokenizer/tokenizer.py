"""``Tokenizer``: byte-level BPE encode/decode with special tokens, streaming, and file formats.

Serialization (one format, GPT-2's): a directory with ``vocab.json`` ({token: id}, tokens written
through GPT-2's byte-to-unicode map so every byte string is printable and space-free),
``merges.txt`` (one merge per line, ``a b`` in the same map, in merge order) and
``special_tokens.json`` (the list of special tokens), plus ``meta.json`` with each file's size and
sha256 and the counts, checked on loading. GPT-2's own ``vocab.json`` / ``merges.txt`` (no
meta.json) load as they are.
"""

from __future__ import annotations

import array
import hashlib
import heapq
import json
import os
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from tokenizer import native
from tokenizer.pretokenize import PRETOKEN_RE, SpecialFinder, require_dir, special_splitter, split_on_specials
from tokenizer.special import validate_special_tokens


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {v: k for k, v in bytes_to_unicode().items()}


@lru_cache(maxsize=1)
def _from_printable_table() -> dict[int, str]:
    """``str.translate`` table from GPT-2's printable chars to latin-1 (one char per byte); the 68
    byte values that GPT-2 remaps (space, controls) go to a char past latin-1, so a string that
    uses them directly fails to encode instead of passing through."""
    to = bytes_to_unicode()
    back = {ord(c): chr(b) for b, c in to.items()}
    back.update({b: "\uffff" for b, c in to.items() if ord(c) != b})
    return back


def to_printable(b: bytes) -> str:
    """``b`` in GPT-2's byte-to-unicode alphabet (how vocab.json and merges.txt write tokens)."""
    return b.decode("latin-1").translate(bytes_to_unicode())


def from_printable(s: str) -> bytes:
    """The bytes ``s`` writes in GPT-2's byte-to-unicode alphabet; ValueError names the first
    character outside it."""
    try:
        return s.translate(_from_printable_table()).encode("latin-1")
    except UnicodeEncodeError:
        m = unicode_to_bytes()
        bad = next(c for c in s if c not in m)
        raise ValueError(f"character {bad!r} is not in GPT-2's byte-to-unicode map") from None


META_FORMAT = "fastlm-bpe-1"


def _damaged(f: Path, detail: str) -> ValueError:
    """The error for a file that does not match meta.json, with the way to keep a meant edit."""
    return ValueError(
        f"{f} is damaged: {detail}; if the change was meant, load the files with Tokenizer.from_files"
        " and save them again, which writes a new meta.json"
    )


class Tokenizer:
    """Byte-level BPE tokenizer. ``vocab``: id -> bytes; ``merges``: in creation order."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
    ):
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = validate_special_tokens(list(special_tokens or []))
        self.byte_to_id: dict[bytes, int] = {b: i for i, b in self.vocab.items()}
        for s in self.special_tokens:
            sb = s.encode("utf-8")
            if sb not in self.byte_to_id:
                new_id = max(self.vocab, default=-1) + 1
                self.vocab[new_id] = sb
                self.byte_to_id[sb] = new_id
        self.special_ids = {s: self.byte_to_id[s.encode("utf-8")] for s in self.special_tokens}
        for i in range(256):
            if bytes([i]) not in self.byte_to_id:
                raise ValueError(f"vocab lacks the single byte {i}: not a byte-level BPE vocab")
        self._byte_ids = [self.byte_to_id[bytes([i])] for i in range(256)]
        # Merge ranks over ids: the pair (id_a, id_b) merges into id_ab with priority rank.
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        self._merge_ids: list[tuple[int, int, int]] = []  # (id_a, id_b, id_ab) in rank order
        for rank, (a, b) in enumerate(self.merges):
            try:
                ia, ib, iab = self.byte_to_id[a], self.byte_to_id[b], self.byte_to_id[a + b]
            except KeyError:
                raise ValueError(f"merge {a!r} + {b!r} refers to bytes missing from the vocab") from None
            self._ranks.setdefault((ia, ib), (rank, iab))
            self._merge_ids.append((ia, ib, iab))
        self._splitter = special_splitter(self.special_tokens)
        self._specials = SpecialFinder(self.special_tokens)  # the same split over bytes, for the core
        self._special_by_bytes = {s.encode("utf-8"): self.special_ids[s] for s in self.special_tokens}
        self._cache: dict[str, list[int]] = {}
        self._encoder = None  # the compiled encoder, built on first use (None: pure Python)
        self._encoder_tried = False
        self._max_id = max(self.vocab)

    # --- encoding ---------------------------------------------------------------------------

    def _bpe(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        raw = piece.encode("utf-8")
        byte_ids = self._byte_ids
        ids = [byte_ids[x] for x in raw]
        if len(ids) > _SHORT_PIECE:
            ids = self._merge_long(ids)
        elif len(ids) > 1:
            ranks = self._ranks
            while len(ids) > 1:
                best = None
                best_i = -1
                for i in range(len(ids) - 1):
                    r = ranks.get((ids[i], ids[i + 1]))
                    if r is not None and (best is None or r[0] < best[0]):
                        best, best_i = r, i
                if best is None:
                    break
                ids[best_i : best_i + 2] = [best[1]]  # the leftmost lowest-rank pair, one at a time
        if len(self._cache) < 1_000_000 and len(piece) <= 256:
            self._cache[piece] = ids
        return ids

    def _merge_long(self, ids: list[int]) -> list[int]:
        """BPE on a long piece in O(n log n): a linked list of symbols and a heap of candidate merges
        keyed (rank, position), so the lowest-rank pair, leftmost among equals, merges first, as in
        the rescanning loop. Entries whose symbols changed after they were pushed are skipped."""
        ranks = self._ranks
        n = len(ids)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            r = ranks.get((ids[i], ids[i + 1]))
            if r is not None:
                heap.append((r[0], i, ids[i], ids[i + 1], r[1]))
        heapq.heapify(heap)
        dead = bytearray(n)
        while heap:
            _, i, a, b, ab = heapq.heappop(heap)
            j = nxt[i]
            if dead[i] or j < 0 or ids[i] != a or ids[j] != b:
                continue
            ids[i] = ab
            dead[j] = 1
            k = nxt[i] = nxt[j]
            if k >= 0:
                prv[k] = i
                r = ranks.get((ab, ids[k]))
                if r is not None:
                    heapq.heappush(heap, (r[0], i, ab, ids[k], r[1]))
            h = prv[i]
            if h >= 0:
                r = ranks.get((ids[h], ab))
                if r is not None:
                    heapq.heappush(heap, (r[0], h, ids[h], ab, r[1]))
        out = []
        i = 0
        while i >= 0:
            out.append(ids[i])
            i = nxt[i]
        return out

    def _native_encoder(self):
        if not self._encoder_tried:
            self._encoder_tried = True
            core = native.load()
            if core is not None:  # a repeated pair keeps its first rank there too
                self._encoder = core.Encoder(self._byte_ids, self._merge_ids)
        return self._encoder

    def _encode_plain(self, text: str, out: list[int]) -> None:
        """The pure-Python path's ids of text without special tokens (the core encodes in ``_encode``)."""
        bpe = self._bpe
        for piece in PRETOKEN_RE.findall(text):
            out.extend(bpe(piece))

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens are never split (longest match first). Lone surrogates
        become U+FFFD (see ``replace_lone_surrogates``)."""
        try:
            return self._encode(text)
        except UnicodeEncodeError:
            return self._encode(replace_lone_surrogates(text))

    def _special_spans(self, raw: bytes) -> list[tuple[int, int, int]]:
        """(start, end, id) of each special token in UTF-8 bytes, longest first, left to right."""
        ids = self._special_by_bytes
        return [(a, b, ids[t]) for a, b, t in self._specials.spans(raw)]

    def encode_array(self, text: str) -> array.array:
        """``encode(text)`` as an ``array('I')`` of uint32 (the corpus encoder's form): with the
        compiled core the ids never become Python ints."""
        enc = self._native_encoder()
        if enc is None:
            return array.array("I", self.encode(text))
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raw = replace_lone_surrogates(text).encode("utf-8")
        out = array.array("I")
        out.frombytes(enc.encode(raw, self._special_spans(raw)))
        return out

    def _encode(self, text: str) -> list[int]:
        enc = self._native_encoder()
        if enc is not None:  # one call: the specials' spans found over the bytes, one list built
            raw = text.encode("utf-8")
            return enc.encode_list(raw, self._special_spans(raw))
        out: list[int] = []
        for i, part in enumerate(split_on_specials(text, self._splitter)):
            if i % 2:
                out.append(self.special_ids[part])
            elif part:
                self._encode_plain(part, out)
        return out

    def _partial_special_start(self, buf: str) -> int:
        """Where a suffix of ``buf`` that could still grow into a special token begins (len if none).

        A complete special that is a prefix of a longer one counts as partial too: longest-first
        matching may still turn it into the longer token."""
        start = len(buf)
        for s in self.special_tokens:
            for k in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:k]):
                    start = min(start, len(buf) - k)
                    break
        return start

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Stream ids for the concatenation of ``iterable`` (e.g. a file's lines or blocks) with the
        ids ``encode`` gives for the whole text, holding only an unfinished pretoken in memory.

        GPT-2's pattern decides a pretoken from at most two characters past its start that belong
        to the next pretoken (the contractions 'll, 've, 're: "'" alone until "ll" arrives) or one
        (whitespace before a non-space), and the end of a text segment acts as such a lookahead. So
        the last two pretokens are held back, and the ones before are emitted as matched over the
        whole buffer, never re-split from a shorter string.
        """
        buf = ""
        bpe = self._bpe
        pending: list[str] = []
        pending_len = 0
        for piece in iterable:
            if not piece:
                continue
            # The held text is matched again with each new piece; waiting until as much new text
            # has come as is held keeps that linear when one pretoken runs over many pieces.
            pending.append(piece)
            pending_len += len(piece)
            if pending_len < len(buf):
                continue
            buf += "".join(pending)
            pending, pending_len = [], 0
            hold = ""
            if _SURROGATE.search(buf):
                # A high surrogate at the very end may pair with the next piece's first character.
                hold = buf[-1] if "\ud800" <= buf[-1] <= "\udbff" else ""
                buf = replace_lone_surrogates(buf[: len(buf) - len(hold)]) + hold
            p = min(self._partial_special_start(buf), len(buf) - len(hold))
            parts = split_on_specials(buf[:p], self._splitter)
            for i, part in enumerate(parts[:-1]):
                if i % 2:
                    yield self.special_ids[part]
                elif part:
                    yield from self.encode(part)
            tail = parts[-1]
            keep = 2
            enc = self._native_encoder()
            if enc is not None:
                raw = tail.encode("utf-8")
                ids, consumed = enc.encode_holding(raw, keep)
                yield from ids
                buf = raw[consumed:].decode("utf-8") + buf[p:]
                continue
            # Matched over the whole tail: a match must see its real next character, not an end.
            pieces = PRETOKEN_RE.findall(tail)
            if len(pieces) <= keep:
                buf = buf[p - len(tail) :]
                continue
            done = 0
            for piece in pieces[:-keep]:
                yield from bpe(piece)
                done += len(piece)
            buf = buf[p - len(tail) + done :]
        buf += "".join(pending)
        if buf:
            yield from self.encode(buf)

    # --- decoding ---------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self.vocab
        try:
            return b"".join(vocab[i] for i in ids)
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (0..{self._max_id})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; malformed UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- files --------------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write vocab.json, merges.txt, special_tokens.json and meta.json into ``out_dir``.

        meta.json records each file's size and sha256 and the counts of tokens, merges and special
        tokens, so ``load`` can tell a truncated, missing or edited file from a good one."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        special = {s.encode("utf-8") for s in self.special_tokens}
        vocab_json = {
            (b.decode("utf-8") if b in special else to_printable(b)): i for i, b in sorted(self.vocab.items())
        }
        lines = ["#version: 0.2 (fastlm byte-level BPE; GPT-2 format)"]
        lines += [f"{to_printable(a)} {to_printable(b)}" for a, b in self.merges]
        texts = {
            "vocab.json": json.dumps(vocab_json, ensure_ascii=False),
            "merges.txt": "\n".join(lines) + "\n",
            "special_tokens.json": json.dumps(self.special_tokens, ensure_ascii=False),
        }
        files = {}
        for name, text in texts.items():
            data = text.encode("utf-8")
            _atomic_write(out / name, data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        meta = {
            "format": META_FORMAT,
            "vocab_size": len(self.vocab),
            "merges": len(self.merges),
            "num_special_tokens": len(self.special_tokens),
            "hash": self.fingerprint(),
            "files": files,
        }
        _atomic_write(out / "meta.json", json.dumps(meta, indent=2).encode())
        return out

    @classmethod
    def from_files(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike, special_tokens: list[str] | None = None
    ) -> Tokenizer:
        """Load GPT-2-format ``vocab.json`` and ``merges.txt`` (ours or OpenAI's)."""
        for p in (vocab_path, merges_path):
            if not Path(p).is_file():
                raise FileNotFoundError(f"tokenizer file not found: {p}")
        special_tokens = validate_special_tokens(list(special_tokens or []))
        raw_vocab = _read_json(Path(vocab_path), dict)
        vocab = {}
        for tok, i in raw_vocab.items():
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"{vocab_path}: token {tok!r} has id {i!r}, not a non-negative integer")
            try:
                vocab[i] = tok.encode("utf-8") if tok in special_tokens else from_printable(tok)
            except ValueError as e:
                raise ValueError(f"{vocab_path}: token {tok!r}: {e}") from None
        if len(vocab) != len(raw_vocab):
            raise ValueError(f"{vocab_path}: {len(raw_vocab) - len(vocab)} ids are given to more than one token")
        merges = []
        text = _read_text(Path(merges_path))
        for n, line in enumerate(text.splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{merges_path}:{n}: expected two tokens separated by one space, got {line!r}")
            try:
                merges.append((from_printable(parts[0]), from_printable(parts[1])))
            except ValueError as e:
                raise ValueError(f"{merges_path}:{n}: {e}") from None
        try:
            return cls(vocab, merges, special_tokens)
        except ValueError as e:
            raise ValueError(f"{vocab_path} / {merges_path}: {e}") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load a directory written by ``save`` (or by ``python -m tokenizer train``), or GPT-2's own
        vocab.json + merges.txt. Where meta.json exists every file it lists must match its size and
        sha256 and the loaded counts must match; any difference names the file."""
        d = require_dir(directory, "tokenizer directory")
        meta = _read_json(d / "meta.json", dict) if (d / "meta.json").exists() else None
        if meta is not None and "files" in meta:
            for name, want in meta["files"].items():
                f = d / name
                if not f.is_file():
                    raise FileNotFoundError(f"{f} is missing (listed in {d / 'meta.json'})")
                data = f.read_bytes()
                if len(data) != want["bytes"]:
                    why = "truncated?" if len(data) < want["bytes"] else "edited or appended to?"
                    raise _damaged(f, f"{len(data)} bytes, {d / 'meta.json'} records {want['bytes']} ({why})")
                if hashlib.sha256(data).hexdigest() != want["sha256"]:
                    raise _damaged(f, f"its sha256 differs from the one in {d / 'meta.json'}")
        special_path = d / "special_tokens.json"
        specials = _read_json(special_path, list) if special_path.exists() else []
        tok = cls.from_files(d / "vocab.json", d / "merges.txt", specials)
        if meta is not None and "files" in meta:
            for field, got in (("vocab_size", len(tok.vocab)), ("merges", len(tok.merges))):
                if field in meta and meta[field] != got:
                    raise ValueError(f"{d}: {got} {field} loaded, {d / 'meta.json'} records {meta[field]}")
        return tok

    def fingerprint(self) -> str:
        """A short hash identifying the vocab, merges and special tokens."""
        h = hashlib.sha256()
        for i in sorted(self.vocab):
            h.update(i.to_bytes(4, "little") + self.vocab[i] + b"\0")
        for a, b in self.merges:
            h.update(a + b"\1" + b + b"\0")
        h.update("\0".join(self.special_tokens).encode())
        return h.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.vocab)


_SHORT_PIECE = 32  # longer pieces take the heap: rescanning costs more than it saves past this

_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text: str) -> str:
    """``text`` with each lone surrogate (a code point UTF-8 cannot hold) replaced by U+FFFD and each
    high-low surrogate pair joined into its character: tiktoken's rule, so ids stay equal to its."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start} (damaged file?)") from None


def _read_json(path: Path, kind: type):
    """A JSON file's value, which must be a ``kind``; a parse error names the file."""
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}; truncated or damaged?)") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    if kind is list:
        validate_special_tokens(value, str(path))
    return value


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
