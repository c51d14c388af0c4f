"""Checks on special tokens, shared by training, loading and ``python -m train``'s config checks."""

from __future__ import annotations


def validate_special_tokens(tokens: list[str], source: str = "special tokens") -> list[str]:
    """``tokens`` unchanged when every one is a non-empty string and none repeats; else ValueError.

    An empty special token would match between every pair of characters, and a repeated one is
    almost always a typo in a flag or a file; both are refused rather than silently fixed.
    ``source`` names where the tokens came from (a file, a flag) in the error message."""
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise ValueError(f"{source}: special token #{i} is {type(t).__name__} {t!r}, not a string")
        if t == "":
            raise ValueError(f"{source}: special token #{i} is empty (it would match between every character)")
        if t in seen:
            raise ValueError(f"{source}: special token {t!r} is given more than once")
        seen.add(t)
    return list(tokens)
