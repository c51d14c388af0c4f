"""Op backends for the model: ``get_ops("torch")`` and ``get_ops("triton")``.

The model resolves its backend once, when it is built, and reaches every hot op through the returned
namespace. Both backends expose the same functions with the same signatures:

- ``rms_norm(x, weight, eps, out_dtype=None)``: RMSNorm over the last dim (fp32 math, input dtype
  out unless ``out_dtype`` says otherwise).
- ``add_rms_norm(x, r, weight, eps, out_dtype=None) -> (h, y)``: a residual add and the norm after
  it, h = x + r and y = rms_norm(h) (one pass on triton).
- ``rope(x, token_positions, theta)``: rotate adjacent pairs of x (..., T, D).
- ``rope_qk(q, k, token_positions, theta) -> (q, k)``: both of a layer's rotations (one launch on triton).
- ``attention(q, k, v, causal=True, deterministic=True)``: q, k, v (B, H, T, D). deterministic=False
  lets the triton backward sum dQ with fp32 atomics (one pass, 5 matmul units instead of 7; dQ's
  last bits vary run to run); the torch reference ignores it.
- ``swiglu(gate, up)``: silu(gate) * up.
- ``swiglu_packed(h)``: the same of h = [gate | up] (..., 2F), one gradient for h in the backward.
- ``cross_entropy(logits (N, V), targets (N,), ignore_index=-100)`` -> mean.
- ``linear_cross_entropy(x (N, d), weight (V, d), targets (N,), ignore_index=-100)`` -> mean CE of
  x @ weight.T; the triton backend never materialises the (N, V) logits.

Nothing here touches a GPU at import time: the triton backend is imported on first request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from kernels import reference

BACKENDS = ("torch", "triton")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET`` set and not "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True, slots=True)
class Ops:
    name: str
    rms_norm: Callable
    add_rms_norm: Callable
    rope: Callable
    rope_qk: Callable
    attention: Callable
    swiglu: Callable
    swiglu_packed: Callable
    cross_entropy: Callable
    linear_cross_entropy: Callable


def _rope_qk_reference(q, k, token_positions, theta):
    return reference.rope(q, token_positions, theta), reference.rope(k, token_positions, theta)


_TORCH_OPS = Ops(
    name="torch",
    rms_norm=reference.rms_norm,
    add_rms_norm=reference.add_rms_norm,
    rope=reference.rope,
    rope_qk=_rope_qk_reference,
    attention=reference.attention,
    swiglu=reference.swiglu,
    swiglu_packed=reference.swiglu_packed,
    cross_entropy=reference.cross_entropy,
    linear_cross_entropy=reference.linear_cross_entropy,
)

_cache: dict[str, Ops] = {"torch": _TORCH_OPS}


def _build_triton_ops() -> Ops:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the 'triton' kernel backend needs the triton package (pip install 'triton>=3.6'), or use kernels='torch'"
        ) from e
    from kernels.attention import attention
    from kernels.cross_entropy import cross_entropy
    from kernels.linear_cross_entropy import linear_cross_entropy
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rope import rope, rope_qk
    from kernels.swiglu import swiglu, swiglu_packed

    return Ops(
        name="triton",
        rms_norm=rms_norm,
        add_rms_norm=add_rms_norm,
        rope=rope,
        rope_qk=rope_qk,
        attention=attention,
        swiglu=swiglu,
        swiglu_packed=swiglu_packed,
        cross_entropy=cross_entropy,
        linear_cross_entropy=linear_cross_entropy,
    )


def get_ops(name: str | Ops) -> Ops:
    """Return the op namespace for backend ``name`` ("torch" or "triton")."""
    if isinstance(name, Ops):
        return name
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; known backends: {', '.join(BACKENDS)}")
    if name not in _cache:
        _cache[name] = _build_triton_ops()
    return _cache[name]


__all__ = ["BACKENDS", "Ops", "get_ops", "interpreting", "reference"]
