"""The torch reference ops: from-scratch PyTorch, no ``torch.nn.functional``.

This one module is the ``--kernels torch`` backend, the CPU path, the baseline every benchmark beats
and the oracle every Triton kernel is tested against. Math is done in fp32 (fp64 when given fp64) and
results are returned in the input dtype, matching what the fused kernels promise.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # Low-precision inputs are upcast: reductions (sums of squares, exp-sums) lose too much in bf16.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Numerically stable softmax: the max is subtracted so exp never overflows."""
    x_max = x.amax(dim=dim, keepdim=True)
    e = torch.exp(x - x_max)
    return e / e.sum(dim=dim, keepdim=True)


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over any leading batch dims; ``mask`` True means "may attend"."""
    d = q.shape[-1]
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(softmax(scores, dim=-1), v)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, computed in fp32, returned in x's dtype (or ``out_dtype``)."""
    cdt = _compute_dtype(x)
    xf = x.to(cdt)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(cdt)).to(out_dtype or x.dtype)


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the norm after it: (h, rms_norm(h)) with h = x + r."""
    h = x + r
    return h, rms_norm(h, weight, eps, out_dtype)


def rope_angles(token_positions: torch.Tensor, d: int, theta: float, dtype: torch.dtype) -> torch.Tensor:
    """Angles (..., d/2): position p times theta^(-2i/d) for pair i."""
    exponent = torch.arange(0, d, 2, device=token_positions.device, dtype=torch.float64) / d
    inv_freq = (float(theta) ** -exponent).to(dtype)
    return token_positions.to(dtype).unsqueeze(-1) * inv_freq


def rope(x: torch.Tensor, token_positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x's last dim by position-dependent angles.

    x: (..., T, D); token_positions: integers broadcastable to x.shape[:-1].
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {d}")
    cdt = _compute_dtype(x)
    ang = rope_angles(token_positions, d, theta, cdt)
    cos, sin = torch.cos(ang), torch.sin(ang)
    xf = x.to(cdt)
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, deterministic: bool = True
) -> torch.Tensor:
    """q, k, v: (B, H, T, D) -> (B, H, T, D). Materialises the (T x T) scores: the baseline.
    ``deterministic`` is accepted for the triton backend's signature and ignored."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    mask = None
    if causal:
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    cdt = _compute_dtype(q)
    out = scaled_dot_product_attention(q.to(cdt), k.to(cdt), v.to(cdt), mask)
    return out.to(q.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the elementwise heart of the SwiGLU feed-forward."""
    cdt = _compute_dtype(gate)
    return (silu(gate.to(cdt)) * up.to(cdt)).to(gate.dtype)


def swiglu_packed(h: torch.Tensor) -> torch.Tensor:
    """swiglu of the two halves of h (..., 2F): [gate | up], as one matmul with w1 and w3 stacked gives."""
    gate, up = h.chunk(2, dim=-1)
    return swiglu(gate, up)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against integer targets (...).

    Stable for logits of any magnitude (log-sum-exp with the max subtracted). Targets equal to
    ``ignore_index`` are left out of the mean; if every target is ignored the loss is 0.
    """
    cdt = _compute_dtype(logits)
    logits = logits.reshape(-1, logits.shape[-1]).to(cdt)
    targets = targets.reshape(-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    m = logits.amax(dim=-1, keepdim=True)
    lse = (m + torch.log(torch.exp(logits - m).sum(dim=-1, keepdim=True))).squeeze(-1)
    picked = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    losses = torch.where(valid, lse - picked, torch.zeros_like(lse))
    return losses.sum() / valid.sum().clamp(min=1)


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean cross-entropy of x @ weight.T: x (N, d), weight (V, d), targets (N,). Builds the logits."""
    return cross_entropy(torch.matmul(x, weight.t()), targets, ignore_index)
