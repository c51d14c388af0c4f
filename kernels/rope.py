"""Fused rotary position embedding (the handout's adjacent-pair rotation), forward and backward.

Each program rotates a block of rows: pair i of a row at position p turns by p * theta^(-2i/D).
cos/sin are computed in the kernel (fp32) from the integer positions and a (D/2,) table of
frequencies built once per (theta, D, device) in fp64, so positions can be anything, not only
arange, and no (T, D) table is read. ``rope_qk`` rotates a layer's q and k in one launch, sharing
the cos/sin. The backward is the inverse rotation (the same kernel with the sine negated).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_device, pow2_at_least, unit_last_stride


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    qo_ptr,
    ko_ptr,
    pos_ptr,
    inv_freq_ptr,
    stride_q,
    stride_qh,
    stride_k,
    stride_kh,
    stride_qo,
    stride_ko,
    R,
    HALF,
    REPEAT,
    HEADS,
    HAS_K: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_mask = rows < R
    # Input row r is head r % HEADS of outer row r // HEADS: q and k may be views into a packed
    # (tokens, 3, heads, D) projection, whose rows do not collapse into one stride.
    q_rows = (rows // HEADS) * stride_q + (rows % HEADS) * stride_qh
    k_rows = (rows // HEADS) * stride_k + (rows % HEADS) * stride_kh
    pairs = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 2 * BLOCK_H)
    # Rows that share a position (e.g. the heads of one token) read the same entry.
    pos = tl.load(pos_ptr + rows // REPEAT, mask=row_mask, other=0).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + pairs, mask=pairs < HALF, other=0.0)
    ang = pos[:, None] * inv_freq[None, :]
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    if INVERSE:
        sin = -sin
    mask = row_mask[:, None] & (cols < 2 * HALF)[None, :]
    # Whole rows are loaded (coalesced) and split into (even, odd) pairs in registers.
    x = tl.load(q_ptr + q_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_H, 2)))
    out = tl.reshape(tl.join(x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), (BLOCK_R, 2 * BLOCK_H))
    tl.store(qo_ptr + rows[:, None] * stride_qo + cols[None, :], out.to(qo_ptr.dtype.element_ty), mask=mask)
    if HAS_K:
        x = tl.load(k_ptr + k_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_H, 2)))
        out = tl.reshape(tl.join(x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), (BLOCK_R, 2 * BLOCK_H))
        tl.store(ko_ptr + rows[:, None] * stride_ko + cols[None, :], out.to(ko_ptr.dtype.element_ty), mask=mask)


def _positions_per_row(token_positions: torch.Tensor, lead_shape: torch.Size) -> tuple[torch.Tensor, int]:
    """Positions as a flat array plus REPEAT, so row r of x (lead_shape flattened) has pos[r // REPEAT].

    Trailing dims that the positions broadcast over (heads, typically) become REPEAT, so they are
    never expanded in memory.
    """
    if token_positions.dtype.is_floating_point:
        raise TypeError(f"token_positions must be integers, got {token_positions.dtype}")
    p = torch.broadcast_to(token_positions, lead_shape)
    k, repeat = len(lead_shape), 1
    while k > 0 and (p.stride(k - 1) == 0 or lead_shape[k - 1] == 1):
        repeat *= lead_shape[k - 1]
        k -= 1
    base = p[(...,) + (0,) * (len(lead_shape) - k)] if k < len(lead_shape) else p
    return base.reshape(-1).contiguous(), max(repeat, 1)


def _launch_params(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_H): whole rows of D = 2 BLOCK_H, about 2048 elements a program."""
    block_h = pow2_at_least(d // 2)
    return max(1, min(64, 2048 // (2 * block_h))), block_h


def _head_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """x (..., heads, D) as (outer, heads, D) with unit last stride: reshape's view whenever the
    leading dims collapse (as for q, k and v unbound from one packed projection), else its copy."""
    return unit_last_stride(x).reshape(-1, heads, x.shape[-1])


_inv_freq_cache: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def _inv_freq(theta: float, d: int, device: torch.device) -> torch.Tensor:
    """theta^(-2i/d) for i < d/2, computed in fp64 and rounded once (an fp32 pow in the kernel would
    add a few ulps that positions in the thousands amplify)."""
    key = (float(theta), d, device)
    if key not in _inv_freq_cache:
        exponent = torch.arange(0, d, 2, dtype=torch.float64) / d
        _inv_freq_cache[key] = (float(theta) ** -exponent).to(torch.float32).to(device)
    return _inv_freq_cache[key]


def rope_fwd(
    q: torch.Tensor, k: torch.Tensor | None, token_positions: torch.Tensor, theta: float, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    check_device(q)
    d = q.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even last dimension, got {d}")
    if k is not None and k.shape != q.shape:
        raise ValueError(f"rope_qk needs q and k of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    pos, repeat = _positions_per_row(token_positions.to(q.device), q.shape[:-1])
    heads = q.shape[-2] if q.dim() >= 2 else 1
    q3 = _head_rows(q, heads)
    k3 = _head_rows(k, heads) if k is not None else q3
    r = q3.shape[0] * heads
    qo = torch.empty((r, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((r, d), dtype=k.dtype, device=k.device) if k is not None else qo
    if r:
        block_r, block_h = _launch_params(d)
        _rope_kernel[(triton.cdiv(r, block_r),)](
            q3,
            k3,
            qo,
            ko,
            pos,
            _inv_freq(theta, d, q.device),
            q3.stride(0),
            q3.stride(1),
            k3.stride(0),
            k3.stride(1),
            qo.stride(0),
            ko.stride(0),
            r,
            d // 2,
            repeat,
            heads,
            HAS_K=k is not None,
            INVERSE=inverse,
            BLOCK_R=block_r,
            BLOCK_H=block_h,
            num_warps=4,
        )
    return qo.view(q.shape), (ko.view(k.shape) if k is not None else None)


@torch.library.custom_op("fastlm::rope", mutates_args=())
def _rope_op(x: torch.Tensor, token_positions: torch.Tensor, theta: float, inverse: bool) -> torch.Tensor:
    return rope_fwd(x, None, token_positions, theta, inverse)[0]


@_rope_op.register_fake
def _(x, token_positions, theta, inverse):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastlm::rope_qk", mutates_args=())
def _rope_qk_op(
    q: torch.Tensor, k: torch.Tensor, token_positions: torch.Tensor, theta: float, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_fwd(q, k, token_positions, theta, inverse)


@_rope_qk_op.register_fake
def _(q, k, token_positions, theta, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_positions, theta):
        ctx.save_for_backward(token_positions)
        ctx.theta = theta
        return _rope_op(x, token_positions, theta, False)

    @staticmethod
    def backward(ctx, dy):
        (token_positions,) = ctx.saved_tensors
        return _rope_op(dy, token_positions, ctx.theta, True), None, None


class RoPEQKFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, token_positions, theta):
        ctx.save_for_backward(token_positions)
        ctx.theta = theta
        return _rope_qk_op(q, k, token_positions, theta, False)

    @staticmethod
    def backward(ctx, dq, dk):
        (token_positions,) = ctx.saved_tensors
        dq = torch.zeros_like(dq) if dq is None else dq
        dk = torch.zeros_like(dk) if dk is None else dk
        gq, gk = _rope_qk_op(dq, dk, token_positions, ctx.theta, True)
        return gq, gk, None, None


def rope(x: torch.Tensor, token_positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (..., T, D) rotated by integer positions broadcastable to x.shape[:-1]."""
    return RoPEFunction.apply(x, token_positions, float(theta))


def rope_qk(q: torch.Tensor, k: torch.Tensor, token_positions: torch.Tensor, theta: float):
    """Both of a layer's rotations in one launch (q and k of one shape)."""
    if q.shape != k.shape:
        return rope(q, token_positions, theta), rope(k, token_positions, theta)
    return RoPEQKFunction.apply(q, k, token_positions, float(theta))


def compile_cases() -> list[dict]:
    """The configurations ``python -m kernels.compile_check`` compiles, with explicit pointer types."""
    from kernels._utils import compile_case

    ptrs = {
        "q_ptr": "bf16",
        "k_ptr": "bf16",
        "qo_ptr": "bf16",
        "ko_ptr": "bf16",
        "pos_ptr": "i64",
        "inv_freq_ptr": "fp32",
    }
    cases = []
    for d in (32, 128):
        block_r, block_h = _launch_params(d)
        for inverse in (False, True):
            constexprs = {"HAS_K": True, "INVERSE": inverse, "BLOCK_R": block_r, "BLOCK_H": block_h}
            cases.append(compile_case("rope", "_rope_kernel", constexprs, ptrs, label=f"D={d} inverse={inverse}"))
    return cases
