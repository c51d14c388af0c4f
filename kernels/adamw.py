"""Fused AdamW: one launch updates every parameter of a group (a multi-tensor kernel).

The foreach implementation in ``train.optimizer`` makes seven passes over the optimizer's tensors
(lerp into m, v's scale and addcmul, sqrt, + eps, the decay, addcdiv): about 18 fp32 reads and
writes per parameter element, plus two or three launches per pass. Here one kernel reads p, g, m, v
once and writes p, m, v once (7 accesses per element) in one launch.

Each program takes one BLOCK of one tensor: a table of (tensor, block) pairs, built once per set
of tensor sizes, maps programs to work, and a table of each tensor's offset from the first tensor
of its role (rebuilt when one moves: new gradients usually land where the last ones were) gives the
kernel its pointers. The arithmetic is the foreach version's, element for element:
``m <- m + (1 - b1)(g - m)``, ``v <- b2 v + (1 - b2) g^2``, ``p <- p (1 - lr wd)``, then
``p <- p + alpha m / (sqrt(v) + eps)`` with ``alpha = -lr sqrt(1 - b2^t) / (1 - b1^t)``, in fp32
whatever the parameter and gradient dtypes (a low-precision parameter is rounded once, at the end).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_device

BLOCK = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# long: one Triton program (work-list lookup, the four tensors' offsets, the update)
@triton.jit
def _adamw_kernel(
    p_base,
    g_base,
    m_base,
    v_base,
    work_ptr,
    offset_ptr,
    numel_ptr,
    n_tensors,
    scale_ptr,
    decay,
    alpha,
    beta1,
    beta2,
    eps,
    ALIGN_P: tl.constexpr,
    ALIGN_G: tl.constexpr,
    ALIGN_M: tl.constexpr,
    ALIGN_V: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Tensor t's elements start offset_ptr[k * n_tensors + t] elements past base k (p, g, m, v): one
    # pointer argument per role, so Triton knows its type and 16-byte alignment, plus an offset the
    # host has checked is a whole number of 16-byte groups (ALIGN_*: elements per 16 bytes, or 1).
    pid = tl.program_id(0)
    t = tl.load(work_ptr + 2 * pid)
    blk = tl.load(work_ptr + 2 * pid + 1).to(tl.int64)
    n = tl.load(numel_ptr + t)
    p_off = tl.multiple_of(tl.load(offset_ptr + t), ALIGN_P)
    g_off = tl.multiple_of(tl.load(offset_ptr + n_tensors + t), ALIGN_G)
    m_off = tl.multiple_of(tl.load(offset_ptr + 2 * n_tensors + t), ALIGN_M)
    v_off = tl.multiple_of(tl.load(offset_ptr + 3 * n_tensors + t), ALIGN_V)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    g_scale = tl.load(scale_ptr).to(tl.float32) if HAS_SCALE else 1.0  # gradient clipping's factor
    # Whole blocks unmasked (a mask against a size read from memory would keep every access
    # scalar); only a tensor's last, partial block is masked.
    if (blk + 1) * BLOCK <= n:
        _update(
            p_base + p_off + offs,
            g_base + g_off + offs,
            m_base + m_off + offs,
            v_base + v_off + offs,
            offs,
            n,
            g_scale,
            decay,
            alpha,
            beta1,
            beta2,
            eps,
            MASKED=False,
        )
    else:
        _update(
            p_base + p_off + offs,
            g_base + g_off + offs,
            m_base + m_off + offs,
            v_base + v_off + offs,
            offs,
            n,
            g_scale,
            decay,
            alpha,
            beta1,
            beta2,
            eps,
            MASKED=True,
        )


@triton.jit
def _update(p_ptrs, g_ptrs, m_ptrs, v_ptrs, offs, n, g_scale, decay, alpha, beta1, beta2, eps, MASKED: tl.constexpr):
    if MASKED:
        mask = offs < n
        g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptrs, mask=mask, other=0.0)
        v = tl.load(v_ptrs, mask=mask, other=0.0)
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    else:
        mask = None
        g = tl.load(g_ptrs).to(tl.float32)
        m = tl.load(m_ptrs)
        v = tl.load(v_ptrs)
        p = tl.load(p_ptrs).to(tl.float32)
    g = g * g_scale
    m = m + (1.0 - beta1) * (g - m)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    p = p * decay + alpha * (m / (tl.sqrt(v) + eps))
    tl.store(m_ptrs, m, mask=mask)
    tl.store(v_ptrs, v, mask=mask)
    tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)


class LaunchTables:
    """Device tables for one list of tensors, cached: the (tensor, block) work list by sizes, the
    offset table by the tensors' offsets from their role's first tensor. Built in pinned host memory
    and copied without a sync."""

    def __init__(self):
        self._work: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._offsets: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _to(device: torch.device, host: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            return host.pin_memory().to(device, non_blocking=True)
        return host

    def work(self, numels: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (numels, device)
        if key not in self._work:
            blocks = torch.tensor([triton.cdiv(n, BLOCK) for n in numels], dtype=torch.int64)
            tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks)
            first = torch.repeat_interleave(torch.cumsum(blocks, 0) - blocks, blocks)  # each tensor's first program
            pairs = torch.stack([tensor, torch.arange(tensor.numel()) - first], 1).to(torch.int32).reshape(-1)
            self._work[key] = (self._to(device, pairs), self._to(device, torch.tensor(numels, dtype=torch.int64)))
        return self._work[key]

    def offsets(self, offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (offsets, device)
        if key not in self._offsets:
            if len(self._offsets) >= 8:  # gradients that move around every step: keep a few
                self._offsets.pop(next(iter(self._offsets)))
            self._offsets[key] = self._to(device, torch.tensor(offsets, dtype=torch.int64))
        return self._offsets[key]


def supports(tensors: list[torch.Tensor]) -> bool:
    """Whether the fused step can update these tensors in place: plain (not DTensor, FSDP2's
    shards), contiguous, of a dtype it knows, at element-aligned addresses (offsets between tensors
    of a role are then whole elements)."""
    return all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors) and all(
        t.is_contiguous() and t.dtype in _DTYPES and t.data_ptr() % t.element_size() == 0 for t in tensors
    )


# long: the host side of one fused step: checks, the work list, one launch per dtype combination
def adamw_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    tables: LaunchTables,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """One AdamW step, in place, for tensors sharing a step count; ``grad_scale`` (0-d device
    tensor) multiplies the gradients as they are read (the clip factor: p.grad is left as is). One
    launch per combination of parameter, gradient and moment dtypes present (one, in training)."""
    if not params:
        return
    check_device(*params)
    device = params[0].device
    alpha = -lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
    decay = 1.0 - lr * weight_decay
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(f"gradient shape {tuple(g.shape)} does not match its parameter's {tuple(p.shape)}")
        # moments are fp32 unless a loaded state_dict cast them to a low-precision parameter's dtype
        groups.setdefault((p.dtype, g.dtype, exp_avgs[i].dtype, exp_avg_sqs[i].dtype), []).append(i)
    for idx in groups.values():
        idx = [i for i in idx if params[i].numel()]
        if not idx:
            continue
        sets = [
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx],
        ]
        # Offsets in elements from each role's first tensor (same dtype, so whole elements).
        offsets = tuple((t.data_ptr() - s[0].data_ptr()) // t.element_size() for s in sets for t in s)

        def align(s) -> int:  # elements per 16 bytes if every tensor of the role starts on a 16-byte boundary
            return 16 // s[0].element_size() if all(t.data_ptr() % 16 == 0 for t in s) else 1

        work, numels = tables.work(tuple(params[i].numel() for i in idx), device)
        _adamw_kernel[(work.shape[0] // 2,)](
            *(s[0] for s in sets),
            work,
            tables.offsets(offsets, device),
            numels,
            len(idx),
            numels if grad_scale is None else grad_scale.reshape(1),
            decay,
            alpha,
            beta1,
            beta2,
            eps,
            ALIGN_P=align(sets[0]),
            ALIGN_G=align(sets[1]),
            ALIGN_M=align(sets[2]),
            ALIGN_V=align(sets[3]),
            HAS_SCALE=grad_scale is not None,
            BLOCK=BLOCK,
            num_warps=4,
        )


def compile_cases() -> list[dict]:
    """The configurations ``python -m kernels.compile_check`` compiles, with explicit pointer types."""
    from kernels._utils import compile_case

    size = {"fp32": 4, "bf16": 2}
    cases = []
    for p_ty, g_ty in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
        constexprs = {
            "ALIGN_P": 16 // size[p_ty],
            "ALIGN_G": 16 // size[g_ty],
            "ALIGN_M": 4,
            "ALIGN_V": 4,
            "HAS_SCALE": True,
            "BLOCK": BLOCK,
        }
        ptrs = {
            "p_base": p_ty,
            "g_base": g_ty,
            "m_base": "fp32",
            "v_base": "fp32",
            "work_ptr": "i32",
            "offset_ptr": "i64",
            "numel_ptr": "i64",
            "scale_ptr": "fp32",
        }
        floats = {"decay", "alpha", "beta1", "beta2", "eps"}
        cases.append(
            compile_case(
                "adamw", "_adamw_kernel", constexprs, ptrs, label=f"params {p_ty}, grads {g_ty}", floats=floats
            )
        )
    return cases
