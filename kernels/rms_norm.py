"""Fused RMSNorm: y = x * rstd * w with rstd = 1/sqrt(mean(x^2) + eps), over the last dim.

Forward: one pass over each row, saving rstd in fp32 (4 bytes a row) for the backward.
Backward: dx = rstd * (g - x_hat * mean(g * x_hat)) with g = dy * w and x_hat = x * rstd, and a
deterministic dw: a persistent grid, one wave of exactly as many programs as fit on the GPU at
once (read from the compiled kernel's registers and shared memory), each sums its rows' dy * x_hat
into an fp32 partial row; the last program to finish (an atomic ticket) adds the partials up in
program order and writes dw in the weight's dtype. No further launch, the same bits every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import interpreting
from kernels._utils import blocks_per_sm, check_device, pow2_at_least, rows_view, sm_count

MAX_FUSED_WIDTH = 65536  # a whole row lives in registers; wider rows would spill


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr,
    r_ptr,
    h_ptr,
    w_ptr,
    y_ptr,
    rstd_ptr,
    stride_x,
    stride_r,
    stride_h,
    stride_y,
    M,
    N,
    eps,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    pid = tl.program_id(0)
    # int64 row indices: rows * stride can pass 2^31 for large activations.
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    # Sums of squares in fp32 whatever the input dtype: bf16 would lose the small terms.
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # h = x + r, stored (the residual stream goes on) and normalised as stored, rounding included.
        r = tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rmsnorm_bwd_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dw_partial_ptr,
    dw_ptr,
    ticket_ptr,
    dres_ptr,
    dr_ptr,
    stride_dy,
    stride_x,
    stride_dx,
    stride_dres,
    stride_dr,
    M,
    N,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_DR: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # A persistent loop over row blocks: each program keeps its share of dw in registers and writes
    # it once, so the reduction order is fixed by the grid, not by scheduling.
    for start in range(pid * ROWS, M, num_progs * ROWS):
        rows = start + tl.arange(0, ROWS).to(tl.int64)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / N
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DRES:  # the residual stream's own gradient joins here, not in a separate add
            dx += tl.load(dres_ptr + rows[:, None] * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DR:  # the same gradient in the added branch's dtype (bf16 under autocast)
            tl.store(dr_ptr + rows[:, None] * stride_dr + cols[None, :], dx.to(dr_ptr.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=0)
    tl.store(dw_partial_ptr + pid.to(tl.int64) * N + cols, dw_acc, mask=col_mask)
    # The last program to take a ticket sums every program's partial in program order (fixed, so
    # deterministic), casts it and resets the ticket for the next call: no reduction launch, no cast.
    tl.debug_barrier()  # this program's partial row is stored (all its threads) before the ticket
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == num_progs - 1:
        dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for p in range(0, num_progs):
            dw += tl.load(dw_partial_ptr + p * N + cols, mask=col_mask, other=0.0, cache_modifier=".cg")
        tl.store(dw_ptr + cols, dw.to(dw_ptr.dtype.element_ty), mask=col_mask)
        tl.atomic_xchg(ticket_ptr, 0)


def _launch_params(n: int) -> tuple[int, int, int]:
    if n > MAX_FUSED_WIDTH:
        raise ValueError(f"fused RMSNorm supports rows up to {MAX_FUSED_WIDTH} wide, got {n}")
    block_n = pow2_at_least(n)
    # Several short rows per program so each moves at least ~4K elements.
    rows = max(1, min(16, 4096 // block_n))
    num_warps = min(16, max(4, block_n * rows // 1024))
    return block_n, rows, num_warps


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    n = x.shape[-1]
    if weight.shape != (n,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim {n}")


def _fwd(x, r, weight, eps, out_dtype):
    x2 = rows_view(x)
    m, n = x2.shape
    y = torch.empty(
        (m, n), dtype=out_dtype or (x.dtype if r is None else torch.promote_types(x.dtype, r.dtype)), device=x.device
    )
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if r is None:
        r2 = h = x2  # unused (HAS_RES=False)
    else:
        r2 = rows_view(r)
        h = torch.empty((m, n), dtype=torch.promote_types(x.dtype, r.dtype), device=x.device)
    if m:
        block_n, rows, warps = _launch_params(n)
        _rmsnorm_fwd_kernel[(triton.cdiv(m, rows),)](
            x2,
            r2,
            h,
            weight,
            y,
            rstd,
            x2.stride(0),
            r2.stride(0),
            h.stride(0),
            y.stride(0),
            m,
            n,
            eps,
            ROWS=rows,
            BLOCK_N=block_n,
            HAS_RES=r is not None,
            num_warps=warps,
        )
    return h, y, rstd


def rmsnorm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N), weight (N,) -> y (x's shape, x's dtype or ``out_dtype``), rstd (rows,) fp32."""
    check_device(x, weight)
    _check_weight(x, weight)
    _, y, rstd = _fwd(x, None, weight, eps, out_dtype)
    return y.view(x.shape), rstd


def add_rmsnorm_fwd(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x + r (the promoted dtype) and y = RMSNorm(h) in one pass -> h, y, rstd."""
    check_device(x, r, weight)
    _check_weight(x, weight)
    if r.shape != x.shape:
        raise ValueError(f"the residual branch's shape {tuple(r.shape)} must equal the stream's {tuple(x.shape)}")
    h, y, rstd = _fwd(x, r, weight, eps, out_dtype)
    return h.view(x.shape), y.view(x.shape), rstd


def rmsnorm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dres: torch.Tensor | None = None,
    r_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """-> dx (like x), dweight (like weight), and dr: dx again in ``r_dtype`` (None without one).
    ``dres``: a gradient reaching x by another path (the residual stream's), added into dx."""
    n = x.shape[-1]
    x2, dy2 = rows_view(x), rows_view(dy)
    m = x2.shape[0]
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dres2 = x2 if dres is None else rows_view(dres)
    dr = dx if r_dtype is None else torch.empty((m, n), dtype=r_dtype, device=x.device)
    block_n, rows, warps = _launch_params(n)
    dw = torch.empty_like(weight)
    if not m:
        return dx.view(x.shape), dw.zero_(), None if r_dtype is None else dr.view(x.shape)
    ticket = _ticket(x.device)
    meta = dict(ROWS=rows, BLOCK_N=block_n, HAS_DRES=dres is not None, HAS_DR=r_dtype is not None, num_warps=warps)

    def args(partial):
        return (dy2, x2, weight, rstd, dx, partial, dw, ticket, dres2, dr, dy2.stride(0), x2.stride(0))

    strides = (dx.stride(0), dres2.stride(0), dr.stride(0), m, n)
    warm = lambda: (*args(torch.empty((1, n), dtype=torch.float32, device=x.device)), *strides)  # noqa: E731
    progs = min(_bwd_programs(x.device, warm, meta), triton.cdiv(m, rows))
    partial = torch.empty((progs, n), dtype=torch.float32, device=x.device)
    _rmsnorm_bwd_kernel[(progs,)](*args(partial), *strides, **meta)
    return dx.view(x.shape), dw, None if r_dtype is None else dr.view(x.shape)


_tickets: dict[torch.device, torch.Tensor] = {}
_programs: dict[tuple, int] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """A zeroed int32 counter per device; the backward's last program leaves it at zero again.
    (One counter: backward calls on one device must not overlap on different streams.)"""
    if device not in _tickets:
        _tickets[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _tickets[device]


def _bwd_programs(device: torch.device, make_args, meta: dict) -> int:
    """One full wave: SMs x the blocks of this compiled kernel that fit an SM at once (its
    registers and shared memory, read from the compiled kernel; 1.33 waves of 4 x SMs programs
    left a third of the GPU idle in the last). 8 programs in the interpreter."""
    if interpreting() or device.type != "cuda":
        return 8
    key = (device, tuple(sorted(meta.items())))
    if key not in _programs:
        k = _rmsnorm_bwd_kernel.warmup(*make_args(), grid=(1,), **meta)
        k._init_handles()
        props = torch.cuda.get_device_properties(device)  # the SM's limits where torch reports them
        limits = {
            "regs_per_sm": getattr(props, "regs_per_multiprocessor", 65536),
            "shared_per_sm": getattr(props, "shared_memory_per_multiprocessor", 233_472),
            "max_warps": getattr(props, "max_threads_per_multi_processor", 2048) // 32,
        }
        per_sm = blocks_per_sm(k.n_regs, k.metadata.shared, meta["num_warps"], **limits)
        _programs[key] = per_sm * sm_count(device)
    return _programs[key]


# --- registration: opaque named ops for torch.compile, the profiler and FlopCounterMode ----------


@torch.library.custom_op("fastlm::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm_fwd(x, weight, eps, out_dtype)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


@torch.library.custom_op("fastlm::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm_bwd(dy, x, weight, rstd)[:2]


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


@torch.library.custom_op("fastlm::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd_op(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return add_rmsnorm_fwd(x, r, weight, eps, out_dtype)


@_add_rms_norm_fwd_op.register_fake
def _(x, r, weight, eps, out_dtype):
    h_dtype = torch.promote_types(x.dtype, r.dtype)
    return (
        x.new_empty(x.shape, dtype=h_dtype),
        x.new_empty(x.shape, dtype=out_dtype or h_dtype),
        x.new_empty(x.shape[:-1].numel(), dtype=torch.float32),
    )


@torch.library.custom_op("fastlm::add_rms_norm_bwd", mutates_args=())
def _add_rms_norm_bwd_op(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    r_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, dr = rmsnorm_bwd(dy, h, weight, rstd, dh, r_dtype)
    # No r_dtype: r's gradient is dx itself; an op's outputs may not alias, so an empty placeholder.
    return dx, dw, h.new_empty(0) if dr is None else dr


@_add_rms_norm_bwd_op.register_fake
def _(dy, dh, h, weight, rstd, r_dtype):
    return (
        h.new_empty(h.shape),
        weight.new_empty(weight.shape),
        h.new_empty(0) if r_dtype is None else h.new_empty(h.shape, dtype=r_dtype),
    )


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        y, rstd = _rms_norm_fwd_op(x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        # dy comes in y's dtype (bf16 when the output was cast for a matmul); dx leaves in x's.
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd_op(dy, x, weight, rstd)
        return dx, dw, None, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Fused RMSNorm over the last dim; fp32 math, output in x's dtype or ``out_dtype``.

    ``out_dtype`` lets a norm whose output only feeds matmuls write it once in the autocast dtype,
    instead of each matmul casting it again (autocast caches casts of weights, not activations).
    """
    return RMSNormFunction.apply(x, weight, eps, out_dtype)


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, weight, eps, out_dtype):
        h, y, rstd = _add_rms_norm_fwd_op(x, r, weight, eps, out_dtype)
        ctx.save_for_backward(h, weight, rstd)
        ctx.r_dtype = r.dtype
        ctx.set_materialize_grads(False)  # no zeros tensor for an unused h or y
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        # dh: the residual stream's gradient (h also feeds the next add); dy: the norm output's.
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            return dh, dh, None, None, None
        own = ctx.r_dtype != h.dtype  # a bf16 branch on an fp32 stream: its copy written in the same pass
        dx, dw, dr = _add_rms_norm_bwd_op(dy, dh, h, weight, rstd, ctx.r_dtype if own else None)
        return dx, dr if own else dx, dw, None, None


def add_rms_norm(
    x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm in one pass: ``h = x + r`` (promoted dtype: the fp32
    stream plus a bf16 branch under autocast stays fp32) and ``rms_norm(h, weight, eps, out_dtype)``.
    Returns (h, y). Reads x and r once and writes h and y, where separately the norm would read h
    again; the backward adds the stream's gradient into dx and writes the branch's copy in its own
    dtype in the same pass (no separate add and cast)."""
    return AddRMSNormFunction.apply(x, r, weight, eps, out_dtype)


def compile_cases() -> list[dict]:
    """The configurations ``python -m kernels.compile_check`` compiles, with explicit pointer types."""
    from kernels._utils import compile_case

    cases = []
    for n in (512, 4096, 16384):
        block_n, rows, warps = _launch_params(n)
        for res in (False, True) if n <= 4096 else (False,):  # the fused residual add, at model widths
            label = f"N={n}" + (" + residual" if res else "")
            fwd_ptrs = {p: "bf16" for p in ("x_ptr", "r_ptr", "h_ptr", "w_ptr", "y_ptr")}
            cases.append(
                compile_case(
                    "rms_norm",
                    "_rmsnorm_fwd_kernel",
                    {"ROWS": rows, "BLOCK_N": block_n, "HAS_RES": res},
                    {**fwd_ptrs, "rstd_ptr": "fp32"},
                    warps=warps,
                    label=label,
                    floats={"eps"},
                )
            )
            bwd_ptrs = {p: "bf16" for p in ("dy_ptr", "x_ptr", "w_ptr", "dx_ptr", "dres_ptr", "dr_ptr")}
            cases.append(
                compile_case(
                    "rms_norm",
                    "_rmsnorm_bwd_kernel",
                    {"ROWS": rows, "BLOCK_N": block_n, "HAS_DRES": res, "HAS_DR": res},
                    {**bwd_ptrs, "rstd_ptr": "fp32", "dw_partial_ptr": "fp32", "dw_ptr": "bf16", "ticket_ptr": "i32"},
                    warps=warps,
                    label=label,
                )
            )
    return cases
