"""Triton cross-entropy and fused linear cross-entropy against the fp64 reference."""

import pytest
import torch
from kernel_checks import check_op_against_reference

from kernels import get_ops, reference

triton_ops = get_ops("triton")
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def targets_for(n, v, ignored=()):
    t = torch.randint(0, v, (n,), device=DEV)
    for i in ignored:
        t[i] = -100
    return t


@pytest.mark.parametrize(
    "n,v,scale", [(7, 5003, 1.0), (5, 33, 1e4), (1, 1, 1.0), (9, 4097, 10.0), (3, 20011, 5.0), (2, 33001, 3.0)]
)
def test_cross_entropy_forward_and_grad(n, v, scale):
    logits = torch.randn(n, v, device=DEV) * scale
    t = targets_for(n, v, ignored=[0] if n > 2 else [])
    check_op_against_reference(triton_ops.cross_entropy, reference.cross_entropy, [logits, t], scalar=True)


@pytest.mark.parametrize("v", [300, 20011, 33001])  # one-pass rows (up to 32K) and two-sweep rows
def test_backward_scales_by_a_non_unit_upstream_gradient(v):
    logits = torch.randn(4, v, device=DEV)
    t = targets_for(4, v, [2])
    a = logits.clone().requires_grad_()
    (triton_ops.cross_entropy(a, t) * 2.5).backward()
    b = logits.double().requires_grad_()
    (reference.cross_entropy(b, t) * 2.5).backward()
    torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-7, rtol=1e-5)
    x, w = torch.randn(6, 8, device=DEV, requires_grad=True), torch.randn(v, 8, device=DEV, requires_grad=True)
    t6 = targets_for(6, v)
    (triton_ops.linear_cross_entropy(x, w, t6, chunk_size=4) * -0.5).backward()
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (reference.linear_cross_entropy(xd, wd, t6) * -0.5).backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wd.grad, atol=1e-6, rtol=1e-4)


def test_backward_twice_through_a_retained_graph():
    # The benchmark harness times repeated backwards of one forward (retain_graph=True).
    x = torch.randn(4, 10, device=DEV, requires_grad=True)
    w = torch.randn(7, 10, device=DEV, requires_grad=True)
    t = targets_for(4, 7)
    for loss in (triton_ops.cross_entropy(x @ w.t(), t), triton_ops.linear_cross_entropy(x, w, t)):
        grads = []
        for _ in range(2):
            x.grad = w.grad = None
            loss.backward(retain_graph=True)
            grads.append((x.grad.clone(), w.grad.clone()))
        assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_cross_entropy_extreme_logits_are_finite():
    logits = (torch.randn(4, 300, device=DEV) * 1e4).requires_grad_()
    loss = triton_ops.cross_entropy(logits, targets_for(4, 300))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(3, 10, device=DEV, requires_grad=True)
    loss = triton_ops.cross_entropy(logits, torch.full((3,), -100, device=DEV))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_cross_entropy_inplace_writes_gradient_into_logits():
    logits = torch.randn(6, 50, device=DEV)
    t = targets_for(6, 50)
    expect_leaf = logits.clone().requires_grad_()
    expect = triton_ops.cross_entropy(expect_leaf, t)
    expect.backward()
    leaf = logits.clone().requires_grad_()
    work = leaf * 1.0  # a non-leaf buffer the kernel may overwrite
    loss = triton_ops.cross_entropy(work, t, inplace=True)
    loss.backward()
    # The same arithmetic, only a different destination: identical bits.
    assert torch.equal(loss, expect) and torch.equal(leaf.grad, expect_leaf.grad)
    assert torch.equal(work.detach(), expect_leaf.grad)


@pytest.mark.parametrize("n,d,v,chunk", [(37, 16, 5003, 8), (10, 8, 33, 0), (64, 24, 100, 64), (5, 4, 7, 2)])
def test_linear_cross_entropy_forward_and_grads(n, d, v, chunk):
    x, w = torch.randn(n, d, device=DEV), torch.randn(v, d, device=DEV) * 0.5
    t = targets_for(n, v, ignored=[1, 2] if n > 3 else [])
    check_op_against_reference(
        lambda x, w, t: (
            triton_ops.linear_cross_entropy(x, w, t, chunk_size=chunk)
            if chunk
            else triton_ops.linear_cross_entropy(x, w, t)
        ),
        reference.linear_cross_entropy,
        [x, w, t],
        scalar=True,
    )


@pytest.mark.parametrize("v", [1, 3, 5, 5003, 33001])  # rows inside one 16-byte group, one-pass rows, two-sweep rows
@pytest.mark.parametrize("inplace", [False, True])
def test_rows_off_16_byte_boundaries(v, inplace):
    # An odd row stride puts each row's start at a different offset within a 16-byte group: the
    # kernel rounds the start down, loads whole groups, stores whole groups inside the row as
    # vectors and the shared edge groups element by element. Every offset (fp32: 4 per group) and
    # ignored rows among them; neighbours' elements must stay untouched.
    from kernels.cross_entropy import row_alignment

    n = 9
    logits = torch.randn(n, v, device=DEV) * 4
    assert row_alignment(logits, logits) == (1 if v % 16 == 0 else 4)
    t = targets_for(n, v, ignored=[3, 4])
    b = logits.double().requires_grad_()
    reference.cross_entropy(b, t).backward()
    leaf = logits.clone().requires_grad_()
    work = leaf * 1.0
    loss = triton_ops.cross_entropy(work, t, inplace=inplace)
    loss.backward()
    torch.testing.assert_close(loss.double(), reference.cross_entropy(logits.double(), t), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), b.grad, atol=1e-7, rtol=1e-5)
    if inplace:
        assert torch.equal(work.detach(), leaf.grad)
    else:
        assert torch.equal(work.detach(), logits)  # the logits were only read


def test_rows_the_kernel_cannot_round_down_take_the_plain_path():
    from kernels.cross_entropy import row_alignment

    wide = torch.randn(5, 5004, device=DEV) * 3
    leaf = wide.clone().requires_grad_()
    view = leaf[:, 1:]  # starts one element past a 16-byte boundary, stride 5004; its gradient's is 5003
    assert row_alignment(view, torch.empty(5, 5003, device=DEV)) == 1 and row_alignment(view, view) == 1
    t = targets_for(5, 5003, [1])
    loss = triton_ops.cross_entropy(view, t)
    loss.backward()
    b = wide.double().requires_grad_()
    expect = reference.cross_entropy(b[:, 1:], t)
    expect.backward()
    torch.testing.assert_close(loss.double(), expect.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), b.grad, atol=1e-7, rtol=1e-5)


def test_linear_cross_entropy_bad_input():
    x, w = torch.randn(4, 8, device=DEV), torch.randn(10, 9, device=DEV)
    with pytest.raises(ValueError):
        triton_ops.linear_cross_entropy(x, w, targets_for(4, 10))
    with pytest.raises(ValueError):
        triton_ops.cross_entropy(torch.randn(4, 10, device=DEV), targets_for(3, 10))


def test_linear_cross_entropy_flops_are_counted():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(8, 4, device=DEV, requires_grad=True)
    w = torch.randn(10, 4, device=DEV, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        triton_ops.linear_cross_entropy(x, w, targets_for(8, 10)).backward()
    assert fc.get_total_flops() == 6 * 8 * 4 * 10


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_low_precision_on_gpu(dtype):
    logits = torch.randn(4096, 32000, device="cuda") * 3
    check_op_against_reference(
        triton_ops.cross_entropy,
        reference.cross_entropy,
        [logits, targets_for(4096, 32000, [5])],
        dtype=dtype,
        scalar=True,
    )
    x, w = torch.randn(2048, 512, device="cuda"), torch.randn(10000, 512, device="cuda") * 0.05
    check_op_against_reference(
        triton_ops.linear_cross_entropy,
        reference.linear_cross_entropy,
        [x, w, targets_for(2048, 10000, [3])],
        dtype=dtype,
        scalar=True,
    )


def test_linear_cross_entropy_chunks_are_even(monkeypatch):
    from kernels import linear_cross_entropy as lce

    # GPT-2's head in bf16: 16384 x 50257 logits are 1.65 GB, over the 1 GiB budget: two even chunks.
    assert lce.chunk_rows(16384, 50257, 2) == 8192
    assert lce.chunk_rows(16384, 10000, 2) == 16384  # TinyStories' 328 MB: one
    monkeypatch.setattr(lce, "CHUNK_BYTES", 1000 * 4 * 300)  # 300 rows of V = 1000 fp32
    rows = lce.chunk_rows(1001, 1000, 4)
    assert rows % 16 == 0 and -(-1001 // rows) == 4 and 1001 - 3 * rows > 0.5 * rows


def test_linear_cross_entropy_chunking_does_not_read_free_memory(monkeypatch):
    # dweight sums the chunks' products in fp32 in chunk order: a chunk size taken from free GPU
    # memory would change that order (and the bits of dweight) between runs. Free memory is made to
    # look tiny, then huge: the fused head's chunking stays the one its shapes give.
    from kernels import linear_cross_entropy as lce

    seen = []
    real = lce.ce_fwd_into

    def spy(logits, *args, **kwargs):
        seen.append(logits.shape[0])
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(lce, "ce_fwd_into", spy)
    monkeypatch.setattr(lce, "CHUNK_BYTES", 64 * 300 * 4)  # 64 rows of V = 300 fp32: MIN_CHUNK_ROWS
    x, w, t = torch.randn(600, 8, device=DEV), torch.randn(300, 8, device=DEV), targets_for(600, 300)
    runs = []
    for free in (1 << 10, 1 << 40):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, free=free: (free, 1 << 40))
        seen.clear()
        triton_ops.linear_cross_entropy(x, w, t)
        runs.append(list(seen))
    assert runs[0] == runs[1] == [208, 208, 184] and lce.chunk_rows(600, 300, 4) == 208, runs


def test_fused_head_pads_logit_rows_to_16_columns(monkeypatch):
    # V = 5003 is not a multiple of 16: the fused head's logits buffer pads its rows (with -inf) so
    # the cross-entropy kernel runs over whole 16-byte vectors; the padding never reaches the result.
    from kernels import cross_entropy as ce_mod
    from kernels import linear_cross_entropy as lce

    strides = []
    real = ce_mod.ce_fwd_into

    def spy(logits, *args):
        strides.append((logits.shape[1], logits.stride(0)))
        return real(logits, *args)

    monkeypatch.setattr(lce, "ce_fwd_into", spy)
    x, w = torch.randn(37, 16, device=DEV), torch.randn(5003, 16, device=DEV) * 0.3
    check_op_against_reference(
        lambda x, w, t: triton_ops.linear_cross_entropy(x, w, t, chunk_size=16),
        reference.linear_cross_entropy,
        [x, w, targets_for(37, 5003, [4])],
        scalar=True,
    )
    assert strides and all(v == 5008 and s == 5008 for v, s in strides)
