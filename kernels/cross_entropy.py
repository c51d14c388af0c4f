"""Fused cross-entropy over rows of logits (N, V), the gradient written during the forward.

One program per row. Rows up to 32K wide are read once and kept in registers: max, sum and
d loss / d logits = (softmax - onehot) / n_valid come from that one read, and the gradient is
written into a new buffer or in place over the logits when the caller gives them up: one read and
one write of the logits, the minimum. Wider rows take two sweeps (an online max/sum, then the
gradient). The backward scales by the incoming gradient in place, skipped on the device when that
gradient is 1 (a loss that is the graph's output), so it costs nothing in training.
Targets equal to ``ignore_index`` add nothing to the loss or the mean's count; if every target is
ignored the loss is 0 and the gradient is zero (never 0/0). Row offsets are int64: N x V can pass
2^31 elements. Rows whose starts miss 16-byte boundaries (a width like GPT-2's 50,257) are still
read and written in 16-byte vectors: see ``row_alignment``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_device, pow2_at_least
from kernels.reference import IGNORE_INDEX

# Rows up to this width are read once and held in registers: 32K over 32 warps is 32 values a
# thread (58-64 registers, no spills on sm_90 or sm_120 per `python -m kernels.compile_check`, for
# bf16 and fp32; 64K would spill). Covers vocabularies of 10,000 (TinyStories) and 32,000 (OWT).
MAX_SINGLE_PASS_V = 32768


@triton.jit
def _grad_of(x, p, m_row, inv_s, target_p, scale):
    """d loss / d logits of the lanes at positions p: (softmax - onehot) / n_valid."""
    g = tl.exp(x - m_row) * inv_s
    return tl.where(p == target_p, g - 1.0, g) * scale


@triton.jit
def _store_edge_group(
    logits_row, grad_row, q, lead, span, m_row, inv_s, target_p, scale, ZERO: tl.constexpr, ALIGN: tl.constexpr
):
    """The row's elements in the ALIGN-element group at q, if the row covers it only in part: a
    group the row shares with a neighbour, which the vectorised stores skip (they would overwrite
    the neighbour's elements), written here one element at a time."""
    p = q + tl.arange(0, ALIGN)
    if (q < lead) | (q + ALIGN > span):
        mine = (p >= lead) & (p < span)
        if ZERO:
            g = tl.zeros((ALIGN,), tl.float32)
        else:
            x = tl.load(logits_row + p, mask=mine, other=0.0).to(tl.float32)
            g = _grad_of(x, p, m_row, inv_s, target_p, scale)
        tl.store(grad_row + p, g.to(grad_row.dtype.element_ty), mask=mine)


@triton.jit
def _store_row_edges(
    logits_row, grad_row, lead, span, m_row, inv_s, target_p, scale, ZERO: tl.constexpr, ALIGN: tl.constexpr
):
    """The first and the last group of a row (at most 2 x (ALIGN - 1) elements). A row inside one
    group is done by the first call; the second then looks at the group after it, outside the row."""
    _store_edge_group(logits_row, grad_row, 0, lead, span, m_row, inv_s, target_p, scale, ZERO, ALIGN)
    last = tl.maximum((span // ALIGN) * ALIGN, ALIGN)
    _store_edge_group(logits_row, grad_row, last, lead, span, m_row, inv_s, target_p, scale, ZERO, ALIGN)


@triton.jit
def _row_masks(p, lead, span, ALIGN: tl.constexpr):
    """For positions p from the row base: (load, store, in_row). With ALIGN > 1 loads take whole
    ALIGN-element groups that touch the row, stores the groups wholly inside it (both constant
    over a group, so they vectorise); in_row marks the row's own lanes."""
    in_row = (p >= lead) & (p < span)
    if ALIGN > 1:
        q = (p // ALIGN) * ALIGN
        return q < span, (q >= lead) & (q + ALIGN <= span), in_row
    else:
        return p < span, p < span, in_row


# long: one Triton program: the single-pass and two-sweep row paths side by side
@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    targets_ptr,
    grad_ptr,
    loss_ptr,
    n_valid_ptr,
    stride_logits,
    stride_grad,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
    ALIGN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Positions p below are relative to a row base. ALIGN = 1: the row start (Triton vectorises on
    # its own when the row stride is a multiple of 16 elements). ALIGN > 1 (16 bytes of elements;
    # rows of a width like GPT-2's 50,257, whose starts are not 16-byte aligned, and both buffers
    # sharing the stride): the row start rounded down to a 16-byte boundary, so p = lead + column.
    # Loads then read whole ALIGN-element groups (the bytes outside the row belong to the
    # neighbours or lie in the allocation's last 16-byte group, and are masked off in registers);
    # stores write the groups wholly inside the row as vectors and the two edge groups by element.
    if ALIGN > 1:
        row_start = row * stride_logits
        lead = row_start % ALIGN
        base = tl.multiple_of(row_start - lead, ALIGN)
        logits_row = logits_ptr + base
        grad_row = grad_ptr + base
    else:
        lead = 0
        logits_row = logits_ptr + row * stride_logits
        grad_row = grad_ptr + row * stride_grad
    span = lead + V
    target = tl.load(targets_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        for start in range(0, span, BLOCK_V):
            p = start + cols
            _, store_mask, _ = _row_masks(p, lead, span, ALIGN)
            tl.store(grad_row + p, tl.zeros((BLOCK_V,), tl.float32).to(grad_ptr.dtype.element_ty), mask=store_mask)
        if ALIGN > 1:
            _store_row_edges(logits_row, grad_row, lead, span, 0.0, 0.0, 0, 0.0, ZERO=True, ALIGN=ALIGN)
        tl.store(loss_ptr + row, 0.0)
    else:
        scale = 1.0 / tl.maximum(tl.load(n_valid_ptr).to(tl.float32), 1.0)
        target_p = lead + target
        x_t = tl.load(logits_row + target_p).to(tl.float32)
        if SINGLE_PASS:
            # The whole row fits one block (V <= MAX_SINGLE_PASS_V): read it once, keep it in
            # registers for the max, the sum and the gradient: the minimum traffic, one read and
            # one write of the logits.
            p = cols
            load_mask, store_mask, in_row = _row_masks(p, lead, span, ALIGN)
            # lanes outside the row: a huge negative fp32 value, set after the cast (in fp16 it
            # would be -inf)
            x = tl.load(logits_row + p, mask=load_mask, other=0.0).to(tl.float32)
            x = tl.where(in_row, x, -3.0e38)
            m_row = tl.max(x, 0)
            e = tl.exp(x - m_row)
            s_row = tl.sum(e, 0)
            # (m - x_t) + log(s) rather than lse - x_t: no large lse to cancel against x_t.
            tl.store(loss_ptr + row, (m_row - x_t) + tl.log(s_row))
            # softmax as exp(x - m) / s: relative error of a few ulps, unlike exp(x - lse), whose
            # absolute error in lse (~|lse| ulps) would become a relative error of every entry.
            inv_s = 1.0 / s_row
            g = tl.where(p == target_p, e * inv_s - 1.0, e * inv_s) * scale
            tl.store(grad_row + p, g.to(grad_ptr.dtype.element_ty), mask=store_mask)
        else:
            # Online log-sum-exp over blocks: the running max keeps exp() finite for logits of any
            # magnitude. Lanes outside the row hold a huge negative finite value instead of -inf,
            # so no inf - inf appears; their phantom terms are scaled away by exp(m - m_row) = 0.
            m = tl.full((BLOCK_V,), -3.0e38, tl.float32)
            s = tl.zeros((BLOCK_V,), tl.float32)
            for start in range(0, span, BLOCK_V):
                p = start + cols
                load_mask, _, in_row = _row_masks(p, lead, span, ALIGN)
                x = tl.load(logits_row + p, mask=load_mask, other=0.0).to(tl.float32)
                x = tl.where(in_row, x, -3.0e38)
                m_new = tl.maximum(m, x)
                s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
                m = m_new
            m_row = tl.max(m, 0)
            s_row = tl.sum(s * tl.exp(m - m_row), 0)
            tl.store(loss_ptr + row, (m_row - x_t) + tl.log(s_row))
            inv_s = 1.0 / s_row
            # Second sweep: the gradient, possibly over the logits just read (each element is read
            # before it is written, by this program only).
            for start in range(0, span, BLOCK_V):
                p = start + cols
                load_mask, store_mask, _ = _row_masks(p, lead, span, ALIGN)
                x = tl.load(logits_row + p, mask=load_mask, other=0.0).to(tl.float32)
                g = _grad_of(x, p, m_row, inv_s, target_p, scale)
                tl.store(grad_row + p, g.to(grad_ptr.dtype.element_ty), mask=store_mask)
        if ALIGN > 1:
            _store_row_edges(logits_row, grad_row, lead, span, m_row, inv_s, target_p, scale, ZERO=False, ALIGN=ALIGN)


@triton.jit
def _scale_unless_one_kernel(x_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """x *= scale in place, skipped (one scalar read per program) when scale == 1: the usual case of
    a loss that is the graph's output, decided on the device without a host sync."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(x_ptr + offs, (x * scale).to(x_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("fastlm::scale_unless_one_", mutates_args=("x",))
def _scale_unless_one_op(x: torch.Tensor, scale: torch.Tensor) -> None:
    if not x.is_contiguous():
        x.mul_(scale.to(x.dtype))
        return
    n = x.numel()
    if n:
        block = 4096
        _scale_unless_one_kernel[(triton.cdiv(n, block),)](
            x, scale.reshape(1).contiguous(), n, BLOCK=block, num_warps=8
        )


@_scale_unless_one_op.register_fake
def _(x, scale):
    return None


def scale_unless_one_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place ``x *= scale`` (a 0-d tensor) without reading ``scale`` on the host; returns x."""
    _scale_unless_one_op(x, scale)
    return x


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    check_device(logits, targets)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({logits.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise TypeError(f"targets must be integers, got {targets.dtype}")


def _warps(block_v: int) -> int:
    return 32 if block_v > 16384 else 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4


def ce_fwd_into(
    logits: torch.Tensor,
    targets: torch.Tensor,
    grad: torch.Tensor,
    losses: torch.Tensor,
    n_valid: torch.Tensor,
    ignore_index: int,
) -> None:
    """Per-row losses into ``losses`` (N,) fp32 and the mean's gradient into ``grad`` (may be ``logits``)."""
    n, v = logits.shape
    if logits.stride(1) != 1 or grad.stride(1) != 1:
        raise ValueError("cross_entropy needs unit stride along the vocabulary")
    if n == 0:
        return
    align = row_alignment(logits, grad)
    span = v + align - 1  # the most positions a row can cover from its rounded-down start
    single = span <= MAX_SINGLE_PASS_V
    block_v = pow2_at_least(span) if single else 4096
    _ce_fwd_kernel[(n,)](
        logits,
        targets,
        grad,
        losses,
        n_valid,
        logits.stride(0),
        grad.stride(0),
        v,
        ignore_index,
        BLOCK_V=block_v,
        SINGLE_PASS=single,
        ALIGN=align,
        num_warps=_warps(block_v),
    )


def row_alignment(logits: torch.Tensor, grad: torch.Tensor) -> int:
    """The kernel's ALIGN: elements per 16 bytes when rows start off 16-byte boundaries (a row
    stride that is not a multiple of 16 elements, e.g. GPT-2's 50,257) and the kernel can round
    each row's start down to one: both buffers 16-byte aligned and sharing the row stride. Else 1
    (Triton vectorises the usual multiple-of-16 strides itself; anything else runs unvectorised)."""
    stride = logits.stride(0)
    if logits.shape[0] <= 1 or stride % 16 == 0 or grad.stride(0) != stride:
        return 1
    if logits.data_ptr() % 16 or grad.data_ptr() % 16:
        return 1
    return 16 // logits.element_size()


def _count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).sum().to(torch.float32)


def ce_fwd(logits, targets, ignore_index: int, inplace: bool = False):
    _check(logits, targets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_valid = _count_valid(targets, ignore_index)
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    ce_fwd_into(logits, targets, grad, losses, n_valid, ignore_index)
    return losses.sum() / n_valid.clamp(min=1.0), grad


@torch.library.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
def _ce_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ce_fwd(logits, targets, ignore_index)


@_ce_fwd_op.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape)


@torch.library.custom_op("fastlm::cross_entropy_fwd_inplace", mutates_args=("logits",))
def _ce_fwd_inplace_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return ce_fwd(logits, targets, ignore_index, inplace=True)[0]


@_ce_fwd_inplace_op.register_fake
def _(logits, targets, ignore_index):
    return logits.new_empty((), dtype=torch.float32)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, inplace):
        if inplace:
            loss = _ce_fwd_inplace_op(logits, targets, ignore_index)
            grad = logits
        else:
            loss, grad = _ce_fwd_op(logits, targets, ignore_index)
        # Kept as an attribute, not through save_for_backward: the backward scales it in place, and
        # version tracking would then refuse a second backward through the graph (retain_graph).
        ctx.grad = grad
        return loss

    @staticmethod
    def backward(ctx, dloss):
        # The gradient was written in the forward for d loss = 1; scale it in place only if the
        # incoming gradient differs (decided on the device). The saved buffer is handed over, so
        # a second backward through the same graph sees it already scaled.
        return scale_unless_one_(ctx.grad, dloss), None, None, None


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, inplace: bool = False
) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), as an fp32 scalar.

    ``inplace=True`` lets the kernel overwrite ``logits`` with their gradient (saving an (N, V)
    buffer); the caller must not read the logits afterwards.
    """
    return CrossEntropyFunction.apply(logits, targets, ignore_index, inplace)


def compile_cases() -> list[dict]:
    """The configurations ``python -m kernels.compile_check`` compiles, with explicit pointer types."""
    from kernels._utils import compile_case

    def ptrs(dtype):
        return {"logits_ptr": dtype, "targets_ptr": "i64", "grad_ptr": dtype, "loss_ptr": "fp32", "n_valid_ptr": "fp32"}

    cases = []
    for single, block in ((True, 16384), (True, 32768), (False, 4096)):
        for dtype in ("bf16", "fp32") if single else ("bf16",):
            cases.append(
                compile_case(
                    "cross_entropy",
                    "_ce_fwd_kernel",
                    {"BLOCK_V": block, "SINGLE_PASS": single, "ALIGN": 1},
                    ptrs(dtype),
                    warps=_warps(block),
                    label=f"single_pass={single} BLOCK_V={block}",
                )
            )
    # Rows whose starts are off 16-byte boundaries (GPT-2's V = 50,257 in bf16: two sweeps; an odd
    # width in fp32 in one): the width and strides compile as plain ints, as the JIT sees them.
    for single, block, dtype, align in ((False, 4096, "bf16", 8), (True, 16384, "bf16", 8), (True, 8192, "fp32", 4)):
        cases.append(
            compile_case(
                "cross_entropy",
                "_ce_fwd_kernel",
                {"BLOCK_V": block, "SINGLE_PASS": single, "ALIGN": align},
                ptrs(dtype),
                warps=_warps(block),
                plain_ints={"V", "stride_logits", "stride_grad"},
                label=f"single_pass={single} BLOCK_V={block} odd V, ALIGN={align}",
            )
        )
    cases.append(
        compile_case(
            "cross_entropy",
            "_scale_unless_one_kernel",
            {"BLOCK": 4096},
            {"x_ptr": "bf16", "scale_ptr": "fp32"},
            warps=8,
        )
    )
    return cases
