"""Fused SwiGLU activation: out = silu(gate) * up, elementwise (the three matmuls stay in cuBLAS).

The backward recomputes sigmoid(gate) from the saved inputs instead of storing silu(gate): one
less activation of size (tokens x d_ff) kept alive per layer.
    d gate = dy * up * s * (1 + gate * (1 - s)),   d up = dy * gate * s,   s = sigmoid(gate)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_device, pow2_at_least, rows_view

BLOCK = 1024


@triton.jit
def _silu_mul(g, u):
    return g * tl.sigmoid(g) * u


@triton.jit
def _silu_mul_grads(dy, g, u):
    """(d gate, d up) of silu(g) * u, from the inputs (sigmoid recomputed, nothing stored)."""
    s = tl.sigmoid(g)
    return dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel can pass 2^31
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _silu_mul(g, u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dg, du = _silu_mul_grads(dy, g, u)
    tl.store(dgate_ptr + offs, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, du.to(dup_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_fwd_kernel(h_ptr, out_ptr, R, F, stride_h, stride_out, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    # h (R, 2F): gate = h[:, :F], up = h[:, F:]; out (R, F). 2-D tiles: row and column come from
    # the program ids, not from dividing a flat index by F (64-bit divisions per element would
    # cost more ALU time than the memory traffic they address).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    gate = h_ptr + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_out + cols[None, :], _silu_mul(g, u).to(out_ptr.dtype.element_ty), mask=mask
    )


@triton.jit
def _swiglu_packed_bwd_kernel(
    dy_ptr,
    h_ptr,
    dh_ptr,
    R,
    F,
    stride_dy,
    stride_h,
    stride_dh,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    # The gradient lands in one (R, 2F) buffer, as the packed projection's matmul wants it.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < R)[:, None] & (cols < F)[None, :]
    gate = h_ptr + rows[:, None] * stride_h + cols[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    dg, du = _silu_mul_grads(dy, g, u)
    dgate = dh_ptr + rows[:, None] * stride_dh + cols[None, :]
    tl.store(dgate, dg.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate + F, du.to(dh_ptr.dtype.element_ty), mask=mask)


def _packed_blocks(f: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_F): 1024-element tiles, at most 256 columns wide (d_ff = 1344 takes 6
    column blocks, the last 1/4 full)."""
    block_f = min(256, pow2_at_least(f))
    return max(1, 1024 // block_f), block_f


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_device(gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    gate, up = _flat(gate), _flat(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out


def swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy, gate, up = _flat(dy), _flat(gate), _flat(up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=4)
    return dgate, dup


def _packed_rows(h: torch.Tensor) -> tuple[torch.Tensor, int]:
    check_device(h)
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs an even last dim (gate and up halves), got {h.shape[-1]}")
    return rows_view(h), h.shape[-1] // 2


def swiglu_packed_fwd(h: torch.Tensor) -> torch.Tensor:
    h2, f = _packed_rows(h)
    r = h2.shape[0]
    out = torch.empty((r, f), dtype=h.dtype, device=h.device)
    if out.numel():
        block_r, block_f = _packed_blocks(f)
        _swiglu_packed_fwd_kernel[(triton.cdiv(r, block_r), triton.cdiv(f, block_f))](
            h2, out, r, f, h2.stride(0), out.stride(0), BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4
        )
    return out.view(*h.shape[:-1], f)


def swiglu_packed_bwd(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    h2, f = _packed_rows(h)
    dy2 = rows_view(dy)
    r = h2.shape[0]
    dh = torch.empty((r, 2 * f), dtype=h.dtype, device=h.device)
    if dh.numel():
        block_r, block_f = _packed_blocks(f)
        _swiglu_packed_bwd_kernel[(triton.cdiv(r, block_r), triton.cdiv(f, block_f))](
            dy2, h2, dh, r, f, dy2.stride(0), h2.stride(0), dh.stride(0), BLOCK_R=block_r, BLOCK_F=block_f, num_warps=4
        )
    return dh.view(h.shape)


@torch.library.custom_op("fastlm::swiglu_packed_fwd", mutates_args=())
def _swiglu_packed_fwd_op(h: torch.Tensor) -> torch.Tensor:
    return swiglu_packed_fwd(h)


@_swiglu_packed_fwd_op.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


@torch.library.custom_op("fastlm::swiglu_packed_bwd", mutates_args=())
def _swiglu_packed_bwd_op(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return swiglu_packed_bwd(dy, h)


@_swiglu_packed_bwd_op.register_fake
def _(dy, h):
    return h.new_empty(h.shape)


class SwiGLUPackedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return _swiglu_packed_fwd_op(h)

    @staticmethod
    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return _swiglu_packed_bwd_op(dy, h)


def swiglu_packed(h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h = [gate | up] (..., 2F), the output of one matmul with w1 and w3
    stacked; the backward writes one (..., 2F) gradient for that matmul (split halves would make
    autograd concatenate two)."""
    return SwiGLUPackedFunction.apply(h)


@torch.library.custom_op("fastlm::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastlm::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd_op(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd_op(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with fp32 math, output in gate's dtype."""
    return SwiGLUFunction.apply(gate, up)


def compile_cases() -> list[dict]:
    """The configurations ``python -m kernels.compile_check`` compiles, with explicit pointer types."""
    from kernels._utils import compile_case

    block_r, block_f = _packed_blocks(1344)
    packed = {"BLOCK_R": block_r, "BLOCK_F": block_f}
    label = f"BLOCK_R={block_r} BLOCK_F={block_f}"
    bf16 = lambda *names: {n: "bf16" for n in names}  # noqa: E731
    return [
        compile_case("swiglu", "_swiglu_fwd_kernel", {"BLOCK": BLOCK}, bf16("gate_ptr", "up_ptr", "out_ptr")),
        compile_case(
            "swiglu",
            "_swiglu_bwd_kernel",
            {"BLOCK": BLOCK},
            bf16("dy_ptr", "gate_ptr", "up_ptr", "dgate_ptr", "dup_ptr"),
        ),
        compile_case("swiglu", "_swiglu_packed_fwd_kernel", packed, bf16("h_ptr", "out_ptr"), label=label),
        compile_case("swiglu", "_swiglu_packed_bwd_kernel", packed, bf16("dy_ptr", "h_ptr", "dh_ptr"), label=label),
    ]
