"""Causal (or full) flash attention, forward and backward, FlashAttention-2 style.

q, k, v: (B, H, T, D) with any strides whose last one is 1 (the model passes transposed views of
(B, T, H, D) projections, which are read in place). Forward: query tiles against key tiles with an
online softmax in the log2 domain (exp2, log2(e) folded into the scale), fp32 accumulators; blocks
wholly above the diagonal are never visited and only the diagonal band is masked. It saves O and the
row log-sum-exp (log2 units, fp32): memory O(T), never (T x T).

Backward: a pass for delta = rowsum(dO * O), then dK/dV by key block (looping over query blocks)
and dQ by query block (looping over key blocks). No atomics: the gradients are deterministic. As in
the forward, only blocks on the diagonal band (and dQ's block at the tail of T, without the causal
mask) pay for a mask; rows and keys past T are loaded as zeros and add nothing.

fp32 inputs are accepted (the interpreter tests run them); on a GPU their dots run in full fp32
("ieee"), slower than tensor cores but exact, so fp32 runs agree with the torch backend.

The head dim D is a compile-time constant: with D == BLOCK_D (32, 64, 128) the head-dim mask
folds away, so tiles load as 16-byte vectors and the K/V (and Q/dO) loads are software-pipelined
with cp.async. With D a runtime value, its mask made every load a 2-byte scalar and no loop was
pipelined (found by reading the compiled TTGIR; `python -m kernels.compile_check` counts them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._utils import check_device, interpreting, pow2_at_least, unit_last_stride

LOG2E = 1.4426950408889634


@triton.jit
def _head(ptr, bh, H, stride_b, stride_h):
    """Pointer to the (b, h) slice of a (B, H, T, D) tensor; int64 since b * stride_b can pass 2^31."""
    return ptr + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _tile(base, rows, stride_t, cols):
    """Pointers to a (rows, cols) tile of one head: rows along T, cols along D (unit stride)."""
    return base + rows[:, None] * stride_t + cols[None, :]


@triton.jit
def _fwd_inner(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_n,
    offs_d,
    lo,
    hi,
    T,
    D,
    qk_scale,
    MASK_CAUSAL: tl.constexpr,
    MASK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    d_mask = offs_d < D
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < T
        k = tl.load(
            k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :] & d_mask[:, None], other=0.0
        )
        # Raw scores: the max is taken on them (scale > 0 keeps its place), and the scale goes into
        # exp2's argument as one FMA per element, s * qk_scale - m, not a multiply and a subtract.
        s = tl.dot(q, k, input_precision=DOT_PRECISION)
        if MASK_CAUSAL:
            s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
        if MASK_T:
            s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(_tile(v_base, cols, stride_vt, offs_d), mask=col_ok[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# long: one Triton program; most lines are the 20-odd arguments of each _fwd_inner call
@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    T,
    D: tl.constexpr,
    qk_scale,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Causal: the last query blocks visit the most key blocks; they are launched first (program
    # ids run in launch order) so the short ones fill the tail instead of idling SMs behind a long one.
    start_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)
    bh = tl.program_id(1)
    k_base = _head(K, bh, H, stride_kb, stride_kh)
    v_base = _head(V, bh, H, stride_vb, stride_vh)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    q_mask = row_ok[:, None] & (offs_d < D)[None, :]
    q = tl.load(_tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, stride_qt, offs_d), mask=q_mask, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if CAUSAL:
        # Key blocks left of this query block need no mask; the diagonal band does; blocks to the
        # right are wholly masked and skipped (half the work of full attention).
        tl.static_assert(BLOCK_M % BLOCK_N == 0, "causal forward tiles need BLOCK_M a multiple of BLOCK_N")
        diag = start_m * BLOCK_M
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_n,
            offs_d,
            0,
            diag,
            T,
            D,
            qk_scale,
            False,
            False,
            BLOCK_N,
            DOT_PRECISION,
        )
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_n,
            offs_d,
            diag,
            tl.minimum(diag + BLOCK_M, T),
            T,
            D,
            qk_scale,
            True,
            True,
            BLOCK_N,
            DOT_PRECISION,
        )
    else:
        full = (T // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_n,
            offs_d,
            0,
            full,
            T,
            D,
            qk_scale,
            False,
            False,
            BLOCK_N,
            DOT_PRECISION,
        )
        acc, l_i, m_i = _fwd_inner(
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_m,
            offs_n,
            offs_d,
            full,
            T,
            T,
            D,
            qk_scale,
            False,
            True,
            BLOCK_N,
            DOT_PRECISION,
        )
    acc = acc / l_i[:, None]
    tl.store(
        _tile(_head(O, bh, H, stride_ob, stride_oh), offs_m, stride_ot, offs_d), acc.to(O.dtype.element_ty), mask=q_mask
    )
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < D)[None, :]
    o = tl.load(_tile(_head(O, bh, H, stride_ob, stride_oh), offs_m, stride_ot, offs_d), mask=mask, other=0.0)
    do = tl.load(_tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, stride_dot, offs_d), mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_block(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    LSE,
    DELTA,
    row_base,
    start_m,
    offs_m0,
    offs_n,
    offs_d,
    d_mask,
    stride_qt,
    stride_dot,
    T,
    qk_scale,
    in_band,
    dq_base,
    stride_dqt,
    sm_scale,
    DOT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    DQ_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One query block's share of a key block's dK and dV. Rows past T load as zeros (q, dO, lse,
    delta), so they add nothing and need no mask; nor do keys past T, whose rows are never stored.
    With ATOMIC_DQ, also this key block's share of the query block's dQ (dS @ K, the fifth matmul),
    added into an fp32 buffer with atomics: summed in whatever order the programs arrive."""
    offs_m = start_m + offs_m0
    row_ok = offs_m < T
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(_tile(q_base, offs_m, stride_qt, offs_d), mask=q_mask, other=0.0)
    do = tl.load(_tile(do_base, offs_m, stride_dot, offs_d), mask=q_mask, other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M): scores transposed
    p_t = tl.exp2(s_t - lse[None, :])
    if in_band:
        p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        if DQ_T and BLOCK_D >= 64:
            # dQ^T = K^T dS^T, (D, BLOCK_M): its rows are the head dim, so the key block's tiles
            # (32 query rows, up to 128 keys) still give each Hopper warpgroup 64 distinct rows
            # (at D = 32 the rows would be too few: dQ untransposed, on 64-row query blocks).
            dq_t = tl.dot(tl.trans(k), ds_t.to(k.dtype), input_precision=DOT_PRECISION) * sm_scale
            dq_ptrs = dq_base + offs_m[None, :] * stride_dqt + offs_d[:, None]
            tl.atomic_add(dq_ptrs, dq_t, mask=tl.trans(q_mask), sem="relaxed")
        else:  # mma.sync targets: the untransposed product keeps fewer registers live (sm_120)
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(_tile(dq_base, offs_m, stride_dqt, offs_d), dq, mask=q_mask, sem="relaxed")
    return dk, dv


# long: one Triton program; most lines are arguments (strides of nine tensors)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQ,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    H,
    T,
    D: tl.constexpr,
    qk_scale,
    sm_scale,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ATOMIC_DQ: tl.constexpr = False,
    DQ_T: tl.constexpr = True,
):
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kv_mask = (offs_n < T)[:, None] & d_mask[None, :]
    k = tl.load(_tile(_head(K, bh, H, stride_kb, stride_kh), offs_n, stride_kt, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_tile(_head(V, bh, H, stride_vb, stride_vh), offs_n, stride_vt, offs_d), mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_base = _head(Q, bh, H, stride_qb, stride_qh)
    do_base = _head(DO, bh, H, stride_dob, stride_doh)
    dq_base = _head(DQ, bh, H, stride_dqb, stride_dqh)
    row_base = bh.to(tl.int64) * T
    # Causal: query blocks that end before this key block see none of it and are skipped; only
    # those overlapping its columns (the diagonal band, below band_hi) need the mask. The test is
    # uniform over the program, one loop keeps the software pipelining of the old single loop.
    lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    band_hi = tl.cdiv((start_n + 1) * BLOCK_N, BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(lo, T, BLOCK_M):
        dk, dv = _dkdv_block(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            LSE,
            DELTA,
            row_base,
            start_m,
            offs_m0,
            offs_n,
            offs_d,
            d_mask,
            stride_qt,
            stride_dot,
            T,
            qk_scale,
            start_m < band_hi,
            dq_base,
            stride_dqt,
            sm_scale,
            DOT_PRECISION,
            ATOMIC_DQ,
            DQ_T,
            BLOCK_D,
        )
    dk = dk * sm_scale
    tl.store(
        _tile(_head(DK, bh, H, stride_dkb, stride_dkh), offs_n, stride_dkt, offs_d),
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        _tile(_head(DV, bh, H, stride_dvb, stride_dvh), offs_n, stride_dvt, offs_d),
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_block(
    dq,
    q,
    do,
    lse,
    delta,
    k_base,
    v_base,
    start_n,
    offs_m,
    offs_n0,
    offs_d,
    d_mask,
    stride_kt,
    stride_vt,
    T,
    qk_scale,
    masked,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block's share of a query block's dQ. Keys past T load as zeros, so they add nothing
    to dq = ds @ k, except that their p = exp2(-lse) can overflow for very negative scores (inf * 0):
    the block holding T's tail is therefore masked too (``masked``, uniform over the program)."""
    offs_n = start_n + offs_n0
    col_ok = offs_n < T
    kv_mask = col_ok[:, None] & d_mask[None, :]
    k = tl.load(_tile(k_base, offs_n, stride_kt, offs_d), mask=kv_mask, other=0.0)
    v = tl.load(_tile(v_base, offs_n, stride_vt, offs_d), mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if masked:
        if CAUSAL:  # keys past T lie right of every query: this mask covers them too
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        else:
            p = tl.where(col_ok[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


# long: one Triton program; most lines are arguments (strides of seven tensors)
@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    H,
    T,
    D: tl.constexpr,
    qk_scale,
    sm_scale,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    start_m = tl.cdiv(T, BLOCK_M) - 1 - tl.program_id(0) if CAUSAL else tl.program_id(0)  # heaviest first
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row_ok = offs_m < T
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(_tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, stride_qt, offs_d), mask=q_mask, other=0.0)
    do = tl.load(_tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, stride_dot, offs_d), mask=q_mask, other=0.0)
    row_base = bh.to(tl.int64) * T
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = _head(K, bh, H, stride_kb, stride_kh)
    v_base = _head(V, bh, H, stride_vb, stride_vh)
    # Causal: key blocks wholly left of this query block need no mask, those from band_lo on do,
    # those wholly right of it are skipped. Otherwise only the block holding T's tail is masked.
    hi = tl.minimum((start_m + 1) * BLOCK_M, T) if CAUSAL else T
    mask_from = (start_m * BLOCK_M // BLOCK_N) * BLOCK_N if CAUSAL else (T // BLOCK_N) * BLOCK_N
    for start_n in range(0, hi, BLOCK_N):
        dq = _dq_block(
            dq,
            q,
            do,
            lse,
            delta,
            k_base,
            v_base,
            start_n,
            offs_m,
            offs_n0,
            offs_d,
            d_mask,
            stride_kt,
            stride_vt,
            T,
            qk_scale,
            start_n >= mask_from,
            CAUSAL,
            DOT_PRECISION,
        )
    dq = dq * sm_scale
    tl.store(
        _tile(_head(DQ, bh, H, stride_dqb, stride_dqh), offs_m, stride_dqt, offs_d),
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


# Configs valid on both Hopper (228 KB shared memory) and RTX 5090 (sm_120, ~101 KB): configs that
# do not fit a device fail to compile there and the autotuner drops them. The lists are short on
# purpose: every config is a compile (1-2 s) per new (T, head dim, causal) the first time it is seen.
# Head dims of 128 and more get their own lists: there, the 4-warp tiles that suit D <= 64 run out
# of registers and spill (`python -m kernels.compile_check` prints registers and spilled bytes for
# each config; every config below is spill-free on sm_90 at D = 32, 64 and 128).
def _configs(shapes) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in shapes]


# Forward tiles per architecture family (see _BWD_SHAPES): on Hopper the 128-row tiles at 8 warps
# that the best Hopper kernels use (128x128 and 128x64 at D = 128, 2-4 stages: 128x128 at 3 stages
# takes 224 KB of the 227 KB); on sm_120 the tiles that keep within 64 spilled bytes there (4-warp
# 128x64 spilled 88 B at D = 64).
_FWD_SHAPES = {
    ("sm90", True): [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3)],
    ("sm90", False): [(128, 64, 8, 3), (128, 64, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
    ("mma", True): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    ("mma", False): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
}


def _fwd_configs(large_d: bool = False, family: str = "sm90"):
    return _configs(_FWD_SHAPES[(family, large_d)])


# Backward tiles per architecture (BLOCK_M, BLOCK_N, warps, stages). Hopper ("sm90"): every config
# runs warpgroup MMA (wgmma) and every warpgroup owns distinct output rows: 8 warps (two
# warpgroups) only on a 128-row output tile (dK/dV's BLOCK_N, dQ's BLOCK_M), since 8 warps laid out
# as [8, 1] on 64 rows had both warpgroups compute the same dP^T (24 wgmma where 16 do the work),
# and 64x32 tiles at 8 warps fell back to mma.sync; 3 stages where shared memory allows. sm_120
# and older ("mma"): no wgmma; 4-warp tiles that keep the fp32 accumulators in registers (the
# 8-warp tiles above spill 2.7-5.3 KB a thread there; 64x64 dK/dV at D = 64 spilled 440 B).
# `python -m kernels.compile_check` prints the MMA kind, count against the minimum, stages and spills.
_BWD_SHAPES = {
    ("sm90", True, "dkdv"): [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3)],
    ("sm90", True, "dq"): [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    ("sm90", False, "dkdv"): [(64, 64, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2)],
    ("sm90", False, "dq"): [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
    ("mma", True, "dkdv"): [(32, 64, 4, 2), (32, 64, 4, 3)],
    ("mma", True, "dq"): [(64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3)],
    ("mma", False, "dkdv"): [(32, 64, 4, 2), (32, 64, 4, 3), (32, 128, 8, 3)],
    ("mma", False, "dq"): [(64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 8, 3)],
    # The single-pass backward with dQ by atomics (deterministic=False) runs dK/dV tiles; on sm_120
    # only 4-warp ones (8 warps on 32 query rows computed dQ's product 1.6x over).
    ("sm90", True, "fused"): [(32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 4, 3)],
    ("sm90", False, "fused"): [(64, 64, 4, 3), (64, 128, 8, 2), (64, 128, 8, 3)],
    ("mma", True, "fused"): [(32, 64, 4, 2), (32, 64, 4, 3)],
    ("mma", False, "fused"): [(32, 64, 4, 2), (32, 64, 4, 3)],
}
ARCH_FAMILIES = ("sm90", "mma")


def arch_family(capability: tuple[int, int]) -> str:
    """ "sm90" for Hopper (wgmma), "mma" for everything else the kernels run on (sm_80, sm_120)."""
    return "sm90" if capability[0] == 9 else "mma"


def _bwd_configs(large_d: bool = False, kernel: str = "dkdv", family: str = "sm90"):
    # dK/dV holds a key block and loops over query blocks: BLOCK_N the larger side; dQ the reverse.
    # "fused" (dK/dV plus dQ by atomics) takes dQ transposed on Hopper (DQ_T), as it is untransposed
    # on the mma.sync targets.
    if kernel == "fused":
        return [
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "DQ_T": family == "sm90"}, num_warps=w, num_stages=st)
            for bm, bn, w, st in _BWD_SHAPES[(family, large_d, kernel)]
        ]
    return _configs(_BWD_SHAPES[(family, large_d, kernel)])


def _all_configs(table: dict, *key) -> list:
    """Every family's configs, deduplicated; the autotuner prunes them to the device's family."""
    shapes = []
    for fam in ARCH_FAMILIES:
        shapes += [s for s in table[(fam, *key)] if s not in shapes]
    return _configs(shapes)


def _device_family() -> str:
    return arch_family(torch.cuda.get_device_capability())


def _shape(c) -> tuple[int, int, int, int]:
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def _prune(table: dict, *key):
    def prune(configs, named_args, **kwargs):
        keep = set(table[(_device_family(), *key)])
        return [c for c in configs if _shape(c) in keep]

    return {"early_config_prune": prune}


_KEY = ["T", "D", "BLOCK_D", "CAUSAL", "DOT_PRECISION"]
# Autotuned launchers by "large head dim" (BLOCK_D >= LARGE_D).
LARGE_D = 128
_fwd_tuned = {
    large: triton.autotune(_all_configs(_FWD_SHAPES, large), key=_KEY, prune_configs_by=_prune(_FWD_SHAPES, large))(
        _attn_fwd_kernel
    )
    for large in (False, True)
}
_dkdv_tuned = {
    large: triton.autotune(
        _all_configs(_BWD_SHAPES, large, "dkdv"), key=_KEY, prune_configs_by=_prune(_BWD_SHAPES, large, "dkdv")
    )(_attn_bwd_dkdv_kernel)
    for large in (False, True)
}


# The non-deterministic backward (dQ by atomics) runs the dK/dV tiles; its tuner zeroes the dQ
# buffer before each timed config, since every run adds into it.
def _fused_prune(large_d: bool):
    def prune(configs, named_args, **kwargs):
        keep = {(_shape(c), c.kwargs["DQ_T"]) for c in _bwd_configs(large_d, "fused", _device_family())}
        return [c for c in configs if (_shape(c), c.kwargs["DQ_T"]) in keep]

    return {"early_config_prune": prune}


_fused_tuned = {
    large: triton.autotune(
        [c for fam in ARCH_FAMILIES for c in _bwd_configs(large, "fused", fam)],
        key=_KEY,
        prune_configs_by=_fused_prune(large),
        reset_to_zero=["DQ"],
    )(_attn_bwd_dkdv_kernel)
    for large in (False, True)
}
_dq_tuned = {
    large: triton.autotune(
        _all_configs(_BWD_SHAPES, large, "dq"), key=_KEY, prune_configs_by=_prune(_BWD_SHAPES, large, "dq")
    )(_attn_bwd_dq_kernel)
    for large in (False, True)
}


def _tile_name(cfg) -> str:
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def _block_d(head_dim: int) -> int:
    return max(16, pow2_at_least(head_dim))


def _tuners(head_dim: int):
    large = _block_d(head_dim) >= LARGE_D
    return (
        ("fwd", _fwd_tuned[large]),
        ("bwd_dkdv", _dkdv_tuned[large]),
        ("bwd_dq", _dq_tuned[large]),
        ("bwd_fused", _fused_tuned[large]),
    )


def autotuned_configs(head_dim: int) -> dict[str, str]:
    """The tile each attention autotuner for this head dim chose on its latest call, as
    "BLOCK_MxBLOCK_N wWARPS sSTAGES" (for benchmark records; empty before the first GPU call)."""
    return {
        name: _tile_name(t.best_config) for name, t in _tuners(head_dim) if getattr(t, "best_config", None) is not None
    }


def autotune_timings(head_dim: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of every config in each autotuner's latest tuning run (inf: did not
    fit the device), so one GPU run's records show how close the runners-up came."""
    out = {}
    for name, t in _tuners(head_dim):
        timings = getattr(t, "configs_timings", None) or {}
        out[name] = {_tile_name(c): float(v[0] if isinstance(v, (list, tuple)) else v) for c, v in timings.items()}
    return {k: v for k, v in out.items() if v}


# The interpreter runs every program in Python: small fixed tiles keep CPU tests fast.
# (Tests swap in unequal tiles, as the GPU configs use, to check the band and tail arithmetic.)
_INTERP_FWD_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_INTERP_BWD_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
_INTERP_DQ_T = True  # the non-deterministic backward's dQ product transposed (Hopper) or not


def _precision(q: torch.Tensor) -> str:
    # fp32 inputs get exact fp32 dots ("ieee"), so the fp32 model matches the torch backend (whose
    # matmuls do not use tf32 by default); bf16/fp16 dots are native and ignore this.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q, k, v):
    check_device(q, k, v)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "attention expects q, k, v of one (B, H, T, D) shape; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"flash attention supports fp16, bf16 and fp32, got {q.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim up to 256 supported, got {q.shape[-1]}")


def attn_fwd(q, k, v, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    b, h, t, d = q.shape
    o = torch.empty_like(q)  # keeps q's layout, so a (B, T, H, D) producer gets a (B, T, H, D) output
    lse = torch.empty((b * h, t), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    sm_scale = 1.0 / math.sqrt(d)
    args = (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o), h, t, d, sm_scale * LOG2E)
    block_d = _block_d(d)
    if interpreting():
        grid = (triton.cdiv(t, _INTERP_FWD_BLOCKS["BLOCK_M"]), b * h)
        _attn_fwd_kernel[grid](*args, CAUSAL=causal, DOT_PRECISION=_precision(q), BLOCK_D=block_d, **_INTERP_FWD_BLOCKS)
    else:
        grid = lambda meta: (triton.cdiv(t, meta["BLOCK_M"]), b * h)  # noqa: E731
        _fwd_tuned[block_d >= LARGE_D][grid](*args, CAUSAL=causal, DOT_PRECISION=_precision(q), BLOCK_D=block_d)
    return o, lse


def attn_bwd(
    do, q, k, v, o, lse, causal: bool, deterministic: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV. deterministic (default): a dK/dV kernel by key block and a dQ kernel by query
    block, 7 matmul units (scores and dP are computed in both), bit-identical every run.
    deterministic=False: one pass over key blocks, 5 matmul units, dQ added into an fp32 buffer by
    atomics (then cast): the order of those fp32 additions varies from run to run, so dQ's last bits
    do too."""
    do = unit_last_stride(do)
    b, h, t, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty((b * h, t), dtype=torch.float32, device=q.device)
    block_d = _block_d(d)
    _attn_bwd_preprocess_kernel[(triton.cdiv(t, 64), b * h)](
        o, do, delta, *_strides(o), *_strides(do), h, t, d, BLOCK_M=64, BLOCK_D=block_d
    )
    sm_scale = 1.0 / math.sqrt(d)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    # The dQ accumulator of the atomic pass (fp32, zeroed); the deterministic pass never touches it.
    dq32 = torch.zeros((b, h, t, d), dtype=torch.float32, device=q.device) if not deterministic else dk
    dkdv_args = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        dq32,
        *common,
        *_strides(dk),
        *_strides(dv),
        *_strides(dq32),
        h,
        t,
        d,
        sm_scale * LOG2E,
        sm_scale,
    )
    dq_args = (q, k, v, do, lse, delta, dq, *common, *_strides(dq), h, t, d, sm_scale * LOG2E, sm_scale)
    meta = dict(CAUSAL=causal, DOT_PRECISION=_precision(q), BLOCK_D=block_d)
    if interpreting():
        bm, bn = _INTERP_BWD_BLOCKS["BLOCK_M"], _INTERP_BWD_BLOCKS["BLOCK_N"]
        _attn_bwd_dkdv_kernel[(triton.cdiv(t, bn), b * h)](
            *dkdv_args, **meta, **_INTERP_BWD_BLOCKS, ATOMIC_DQ=not deterministic, DQ_T=_INTERP_DQ_T
        )
        if deterministic:
            _attn_bwd_dq_kernel[(triton.cdiv(t, bm), b * h)](*dq_args, **meta, **_INTERP_BWD_BLOCKS)
    else:
        large = block_d >= LARGE_D
        tuned = _dkdv_tuned if deterministic else _fused_tuned
        tuned[large][lambda m: (triton.cdiv(t, m["BLOCK_N"]), b * h)](*dkdv_args, **meta, ATOMIC_DQ=not deterministic)
        if deterministic:
            _dq_tuned[large][lambda m: (triton.cdiv(t, m["BLOCK_M"]), b * h)](*dq_args, **meta)
    if not deterministic:
        dq.copy_(dq32)
    return dq, dk, dv


@torch.library.custom_op("fastlm::flash_attn_fwd", mutates_args=())
def _attn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return attn_fwd(q, k, v, causal)


@_attn_fwd_op.register_fake
def _(q, k, v, causal):
    b, h, t, _ = q.shape
    return torch.empty_like(unit_last_stride(q)), q.new_empty((b * h, t), dtype=torch.float32)


@torch.library.custom_op("fastlm::flash_attn_bwd", mutates_args=())
def _attn_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attn_bwd(do, q, k, v, o, lse, causal, deterministic)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, deterministic=True):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _register_flops() -> None:
    # Model-FLOPs convention (PaLM, torchtitan): causal counted as dense, backward = 2x forward (no
    # recompute), so FlopCounterMode over the triton model agrees with the torch reference's count.
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.fastlm.flash_attn_fwd)
    def _fwd_flops(q_shape, k_shape, v_shape, *args, **kwargs):
        b, h, t, d = q_shape
        return 4 * b * h * t * k_shape[2] * d

    @register_flop_formula(torch.ops.fastlm.flash_attn_bwd)
    def _bwd_flops(do_shape, q_shape, k_shape, *args, **kwargs):
        b, h, t, d = q_shape
        return 8 * b * h * t * k_shape[2] * d


_register_flops()


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, deterministic=True):
        o, lse = _attn_fwd_op(q, k, v, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.deterministic = causal, deterministic
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.deterministic)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, deterministic: bool = True
) -> torch.Tensor:
    """Flash attention: q, k, v (B, H, T, D) -> (B, H, T, D), O(T) memory.

    deterministic=True (default): the backward is bit-identical run to run (two kernels, 7 matmul
    units). deterministic=False: one backward pass of 5 matmul units with dQ summed by fp32 atomics,
    faster but with run-to-run differences in dQ's last bits (FlashAttention-2's scheme)."""
    return FlashAttentionFunction.apply(q, k, v, causal, deterministic)


# long: a table of every config the autotuners tune over, per kernel and architecture
def compile_cases() -> list[dict]:
    """The configurations ``python -m kernels.compile_check`` compiles (every config each autotuner
    tunes over, causal bf16, per head dim), with explicit pointer types."""
    from kernels._utils import compile_case

    def ptrs(dtype, *names):
        return {n: ("fp32" if n in ("LSE", "DELTA") or (n == "DQ" and "DK" in names) else dtype) for n in names}

    floats = {"qk_scale", "sm_scale"}
    fwd_floats = {"qk_scale"}
    cases = []
    for family, archs in (("sm90", (90,)), ("mma", (120,))):
        for d in (32, 64, 128):
            for cfg in _fwd_configs(d >= LARGE_D, family):
                cases.append(
                    compile_case(
                        "attention",
                        "_attn_fwd_kernel",
                        {"CAUSAL": True, "DOT_PRECISION": "tf32", "D": d, "BLOCK_D": d, **cfg.kwargs},
                        ptrs("bf16", "Q", "K", "V", "O", "LSE"),
                        warps=cfg.num_warps,
                        stages=cfg.num_stages,
                        label=f"D={d} {cfg.kwargs}",
                        floats=fwd_floats,
                        archs=archs,
                    )
                )
    cases.append(
        compile_case(
            "attention",
            "_attn_fwd_kernel",
            {"CAUSAL": False, "DOT_PRECISION": "ieee", "D": 64, "BLOCK_D": 64, "BLOCK_M": 64, "BLOCK_N": 64},
            ptrs("fp32", "Q", "K", "V", "O", "LSE"),
            stages=3,
            label="fp32 ieee D=64",
            floats=fwd_floats,
        )
    )
    for d in (32, 64, 128):
        cases.append(
            compile_case(
                "attention",
                "_attn_bwd_preprocess_kernel",
                {"BLOCK_M": 64, "D": d, "BLOCK_D": d},
                ptrs("bf16", "O", "DO", "DELTA"),
                label=f"D={d}",
                dtype="bf16",
            )
        )
    bwd = {
        "_attn_bwd_dkdv_kernel": ("dkdv", ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV", "DQ")),
        "_attn_bwd_dq_kernel": ("dq", ("Q", "K", "V", "DO", "LSE", "DELTA", "DQ")),
    }
    # Backward configs are per architecture family: Hopper's compiled for sm_90 only, the others'
    # for sm_120 only (``archs``), as the autotuners prune them on a device.
    for family, archs in (("sm90", (90,)), ("mma", (120,))):
        for d in (32, 64, 128):
            # dK/dV twice: the deterministic pass and the one adding dQ by atomics (5 matmul units).
            variants = [(k, which, names) for k, (which, names) in bwd.items()]
            variants.append(("_attn_bwd_dkdv_kernel", "fused", bwd["_attn_bwd_dkdv_kernel"][1]))
            for kernel, which, names in variants:
                atomic = which == "fused"
                extra = {"ATOMIC_DQ": atomic} if kernel == "_attn_bwd_dkdv_kernel" else {}
                for cfg in _bwd_configs(d >= LARGE_D, which, family):
                    cases.append(
                        compile_case(
                            "attention",
                            kernel,
                            {"CAUSAL": True, "DOT_PRECISION": "tf32", "D": d, "BLOCK_D": d, **cfg.kwargs, **extra},
                            ptrs("bf16", *names),
                            warps=cfg.num_warps,
                            stages=cfg.num_stages,
                            label=f"D={d} {cfg.kwargs}" + (" atomic dQ" if atomic else ""),
                            floats=floats,
                            archs=archs,
                        )
                    )
    return cases
