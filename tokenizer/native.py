"""The compiled BPE core (``tokenizer/native/bpe_core.cpp``), built on first use.

The source is compiled once per machine, Python version and source hash with the system C++
compiler into ``$FASTLM_CACHE`` (default ``~/.cache/fastlm``) and loaded from there afterwards. It
needs only pybind11's headers (from the ``pybind11`` package, or the copy inside torch) and not
torch itself at run time, so tokenizing never pays for importing torch. If it cannot be built (no
compiler) or ``FASTLM_NATIVE=0`` is set, ``load()`` returns None and the pure-Python
implementation, which gives identical results, is used.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
import warnings
from pathlib import Path

_lock = threading.Lock()
_module = None
_tried = False
SOURCE = Path(__file__).resolve().parent / "native" / "bpe_core.cpp"
NAME = "fastlm_bpe_core"


def char_class_table() -> bytes:
    """One byte per code point: 1 letter (\\p{L}), 2 number (\\p{N}), 3 whitespace (\\s), 0 other,
    computed with the ``regex`` module so both implementations agree on every character."""
    import numpy as np
    import regex

    cps = np.arange(0x110000, dtype=np.uint32)
    cps = cps[(cps < 0xD800) | (cps > 0xDFFF)]  # surrogates never occur in decoded text
    text = cps.astype("<u4").tobytes().decode("utf-32-le")
    table = np.zeros(0x110000, dtype=np.uint8)
    for cls, pat in ((1, r"\p{L}+"), (2, r"\p{N}+"), (3, r"\s+")):  # runs: thousands of matches, not 10^5
        for m in regex.finditer(pat, text):
            table[cps[m.start() : m.end()]] = cls
    return table.tobytes()


def _cache_dir(cache_dir: Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("FASTLM_CACHE") or Path.home() / ".cache" / "fastlm")


def cached_char_class_table(cache_dir: Path | None = None) -> bytes:
    """``char_class_table()``, kept in the cache directory per ``regex`` and Unicode version (it
    takes ~0.2 s to compute, a first encode's largest fixed cost; reading it back takes ~1 ms)."""
    import unicodedata

    import regex

    path = _cache_dir(cache_dir) / f"char_classes-{regex.__version__}-{unicodedata.unidata_version}.bin"
    try:
        table = path.read_bytes()
        if len(table) == 0x110000:
            return table
    except OSError:
        pass
    table = char_class_table()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(table)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: computed again next time
    return table


def _pybind11_include() -> str:
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("pybind11 headers not found (pip install pybind11)") from None
        inc = Path(spec.submodule_search_locations[0]) / "include"
        if not (inc / "pybind11").is_dir():
            raise RuntimeError("pybind11 headers not found (pip install pybind11)") from None
        return str(inc)


def build(cache_dir: Path | None = None) -> Path:
    """Compile the core (if not cached) and return the path of the shared library."""
    cache = _cache_dir(cache_dir)
    src = SOURCE.read_bytes()
    flags = ["-O3", "-DNDEBUG", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
    tag = hashlib.sha256(src + sys.version.encode() + " ".join(flags).encode()).hexdigest()[:12]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    out = cache / f"{NAME}-{tag}{suffix}"
    if out.exists():
        return out
    import fcntl  # only a compile needs these: a cached build skips importing them (~10 ms a start)
    import shutil
    import subprocess
    import sysconfig

    cache.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found")
    with open(cache / f".{NAME}.lock", "w") as lock:  # one build at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        cmd = [
            cxx,
            *flags,
            f"-DTORCH_EXTENSION_NAME={NAME}",
            f"-I{sysconfig.get_paths()['include']}",
            f"-I{_pybind11_include()}",
            str(SOURCE),
            "-o",
            str(tmp),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed:\n{r.stderr[-2000:]}")
        os.replace(tmp, out)
    return out


def load():
    """The compiled module, or None when it is unavailable."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _tried = True
        if os.environ.get("FASTLM_NATIVE", "1") == "0":
            return None
        try:
            path = build()
            spec = importlib.util.spec_from_file_location(NAME, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            mod.set_char_classes(cached_char_class_table())
            _module = mod
        except Exception as e:
            warnings.warn(
                f"compiled BPE core unavailable ({type(e).__name__}: {e}); using the pure-Python path", stacklevel=2
            )
            _module = None
    return _module
