"""Fused SwiGLU activation: out = silu(gate) * up, elementwise (the three matmuls stay in cuBLAS).

The backward recomputes sigmoid(gate) from the saved inputs instead of storing silu(gate): one
less activation of size (tokens x d_ff) kept alive per layer.
    d gate = dy * up * s * (1 + gate * (1 - s)),   d up = dy * gate * s,   s = sigmoid(gate)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_device, rows_view

BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: numel can pass 2^31
    mask = offs < numel
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(dgate_ptr + offs, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_fwd_kernel(h_ptr, out_ptr, numel, F, stride_h, BLOCK: tl.constexpr):
    # h (rows, 2F): gate = h[:, :F], up = h[:, F:]; out (rows, F) contiguous.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    gate = h_ptr + (offs // F) * stride_h + offs % F
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_bwd_kernel(dy_ptr, h_ptr, dh_ptr, numel, F, stride_h, stride_dh, BLOCK: tl.constexpr):
    # The gradient lands in one (rows, 2F) buffer, as the packed projection's matmul wants it.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    row, col = offs // F, offs % F
    gate = h_ptr + row * stride_h + col
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate + F, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dgate = dh_ptr + row * stride_dh + col
    tl.store(dgate, (dy * u * s * (1.0 + g * (1.0 - s))).to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate + F, (dy * g * s).to(dh_ptr.dtype.element_ty), mask=mask)


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
    out = torch.empty((h2.shape[0], f), dtype=h.dtype, device=h.device)
    n = out.numel()
    if n:
        _swiglu_packed_fwd_kernel[(triton.cdiv(n, BLOCK),)](h2, out, n, f, h2.stride(0), BLOCK=BLOCK, num_warps=4)
    return out.view(*h.shape[:-1], f)


def swiglu_packed_bwd(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    h2, f = _packed_rows(h)
    dy = _flat(dy)
    dh = torch.empty((h2.shape[0], 2 * f), dtype=h.dtype, device=h.device)
    n = dy.numel()
    if n:
        _swiglu_packed_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, h2, dh, n, f, h2.stride(0), dh.stride(0), BLOCK=BLOCK, num_warps=4)
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
