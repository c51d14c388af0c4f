"""Fused LM head + cross-entropy: mean CE of x @ weight.T without ever holding the (N, V) logits.

Tokens go through in chunks: each chunk's logits come from cuBLAS, the cross-entropy kernel turns
them in place into their gradient, and that gradient is immediately pushed through the matmuls for
dx (this chunk's rows) and dweight (accumulated in fp32 across chunks). All of it happens in the
forward, so the backward is a scale by the incoming gradient. Peak extra memory is one chunk of
logits plus an fp32 dweight, instead of the logits, their gradient and softmax temporaries.

The chunk size is a function of N, V and the element size only, never of free GPU memory, so the
chunks, and with them the order in which dweight's fp32 sum adds them up, are the same every run
(bit-identical results). FLOPs are those of the unfused version
(2NdV forward, 4NdV backward), only moved into the forward.
"""

from __future__ import annotations

import torch

from kernels._utils import check_device
from kernels.cross_entropy import _count_valid, ce_fwd_into, scale_unless_one_
from kernels.reference import IGNORE_INDEX

# One chunk of logits at most this large ... Each chunk past the first costs dweight a bf16 (V, d)
# product written and read plus a read and write of the fp32 sum (0.46 GB at GPT-2 small's head):
# 1 GiB makes GPT-2's 16384-token head 2 chunks instead of 7 (256 MiB), and TinyStories' one,
# while the head's extra memory (~1.2 GB there) stays under a quarter of the unfused path's.
CHUNK_BYTES = 2**30
MIN_CHUNK_ROWS = 256  # ... but never so few rows that the matmuls starve


def chunk_rows(n: int, v: int, elem_size: int) -> int:
    """Rows per chunk: as many as the budget allows, then evened out over the chunks that takes
    (16384 rows in two chunks run as 2 x 8192, not 13421 + 2963, whose small tail matmuls are
    slower per FLOP), rounded up to a multiple of 16 rows for the tensor cores. Shapes only: a
    budget read from free memory would change the chunking, hence dweight's summation order, from
    one run to the next."""
    rows = max(1, min(n, max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, v * elem_size))))
    chunks = -(-n // rows)
    even = -(-n // chunks)
    return min(n, -(-even // 16) * 16)


def linear_ce_fwd(x, weight, targets, ignore_index: int, chunk_size: int):
    check_device(x, weight, targets)
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (N, d) and weight (V, d); got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"targets must be (N,) = ({x.shape[0]},), got {tuple(targets.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"x and weight must share a dtype, got {x.dtype} and {weight.dtype}")
    n, _ = x.shape
    v = weight.shape[0]
    chunk = chunk_size if chunk_size > 0 else chunk_rows(n, v, x.element_size())
    n_valid = _count_valid(targets, ignore_index)
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    single = n <= chunk
    dw = None if single else torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
    # One logits buffer for all chunks, its rows padded to a multiple of 16 columns that hold -inf:
    # the cross-entropy kernel then runs over whole 16-byte vectors even when V (GPT-2's 50,257) is
    # not a multiple of 16 (the padding adds nothing to the sum and gets a zero gradient, which
    # the next chunk's refill overwrites). The matmuls see only the first V columns.
    vp = -(-v // 16) * 16
    buf = torch.empty((min(chunk, n), vp), dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        xc = x[start : start + chunk]
        rows = xc.shape[0]
        if vp > v:
            buf[:rows, v:].fill_(float("-inf"))
        logits = torch.matmul(xc, weight.t(), out=buf[:rows, :v])
        ce_fwd_into(
            buf[:rows], targets[start : start + chunk], buf[:rows], losses[start : start + chunk], n_valid, ignore_index
        )
        torch.matmul(logits, weight, out=dx[start : start + chunk])
        if single:
            dw = torch.matmul(logits.t(), xc)
        elif x.dtype == torch.float32:
            dw.addmm_(logits.t(), xc)
        else:
            # The chunk's product is accumulated in fp32 inside cuBLAS; only the sum across
            # chunks is kept in an fp32 buffer so that many chunks do not round away small terms.
            dw += torch.matmul(logits.t(), xc)
    loss = losses.sum() / n_valid.clamp(min=1.0)
    return loss, dx, dw.to(weight.dtype)


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return linear_ce_fwd(x, weight, targets, ignore_index, chunk_size)


@_linear_ce_fwd_op.register_fake
def _(x, weight, targets, ignore_index, chunk_size):
    return x.new_empty((), dtype=torch.float32), x.new_empty(x.shape), weight.new_empty(weight.shape)


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.fastlm.linear_cross_entropy_fwd)
    def _flops(x_shape, w_shape, *args, **kwargs):
        n, d = x_shape
        return 6 * n * d * w_shape[0]  # logits, dx and dweight matmuls, all run in the forward


_register_flops()


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, chunk_size):
        loss, dx, dw = _linear_ce_fwd_op(x, weight, targets, ignore_index, chunk_size)
        # Attributes, not save_for_backward: the backward scales them in place (see cross_entropy).
        ctx.dx, ctx.dw = dx, dw
        return loss

    @staticmethod
    def backward(ctx, dloss):
        # dx and dweight were computed in the forward for d loss = 1
        return scale_unless_one_(ctx.dx, dloss), scale_unless_one_(ctx.dw, dloss), None, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX, chunk_size: int = 0
) -> torch.Tensor:
    """Mean CE of x @ weight.T; x (N, d), weight (V, d), targets (N,). chunk_size 0 = automatic."""
    return LinearCrossEntropyFunction.apply(x, weight, targets, ignore_index, chunk_size)
