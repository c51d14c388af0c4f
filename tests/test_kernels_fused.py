"""Triton RMSNorm, RoPE and SwiGLU against the fp64 torch reference (interpreter on CPU, real on GPU)."""

import pytest
import torch
from kernel_checks import check_op_against_reference, max_err

from kernels import get_ops, reference

triton_ops = get_ops("triton")
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEV) * scale


@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 37), (130, 512), (4, 3, 1000), (2, 16384)])
def test_rms_norm_forward_and_grads(shape):
    x, w = randn(*shape), randn(shape[-1]) + 1.0
    check_op_against_reference(triton_ops.rms_norm, reference.rms_norm, [x, w, 1e-5])


def test_rms_norm_non_contiguous_input():
    x = randn(6, 40)[:, :37]  # row stride 40, not 37: read in place
    w = randn(37)
    check_op_against_reference(triton_ops.rms_norm, reference.rms_norm, [x, w, 1e-5])
    xt = randn(37, 6).t()  # last dim not unit-stride: copied
    check_op_against_reference(triton_ops.rms_norm, reference.rms_norm, [xt, w, 1e-5])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_writes_the_matmul_dtype(out_dtype):
    # fp32 residual in, low-precision normalised rows out (what a pre-norm block's projections read);
    # the gradient comes back in that dtype and dx leaves in fp32.
    x, w = randn(37, 130), randn(130) + 1.0
    y = triton_ops.rms_norm(x, w, 1e-5, out_dtype)
    assert y.dtype == out_dtype
    ref = reference.rms_norm(x.double(), w.double(), 1e-5)
    assert torch.equal(y, ref.to(out_dtype)) or max_err(y, ref) <= ref.abs().max().item() * 2**-7
    dy = randn(37, 130).to(out_dtype)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    triton_ops.rms_norm(xl, wl, 1e-5, out_dtype).backward(dy)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    reference.rms_norm(xr, wr, 1e-5).backward(dy.double())
    assert xl.grad.dtype == torch.float32 and wl.grad.dtype == torch.float32
    assert max_err(xl.grad, xr.grad) < 1e-5 * xr.grad.abs().max().item() + 1e-6
    assert max_err(wl.grad, wr.grad) < 1e-5 * wr.grad.abs().max().item() + 1e-6
    assert reference.rms_norm(x, w, 1e-5, out_dtype).dtype == out_dtype


def test_rms_norm_dweight_is_deterministic():
    x, w, dy = randn(301, 77), randn(77), randn(301, 77)
    grads = []
    for _ in range(3):
        wl = w.clone().requires_grad_()
        triton_ops.rms_norm(x, wl, 1e-5).backward(dy)
        grads.append(wl.grad)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_rms_norm_dweight_reduced_in_kernel_by_the_last_program():
    # dweight comes out of the backward kernel itself (the last program to take the ticket sums the
    # partial rows in program order and casts), and the ticket is left at zero for the next call.
    from kernels import rms_norm as rn

    x, w, dy = randn(301, 77), randn(77), randn(301, 77)
    _, rstd = rn.rmsnorm_fwd(x, w, 1e-5, None)
    dx, dw, _ = rn.rmsnorm_bwd(dy, x, w, rstd)
    x_hat = x.double() * rstd.double()[:, None]
    assert dw.dtype == w.dtype and max_err(dw, (dy.double() * x_hat).sum(0)) < 1e-4
    assert rn._ticket(x.device).item() == 0
    rn.rmsnorm_bwd(dy, x, w, rstd)
    assert rn._ticket(x.device).item() == 0


def test_rms_norm_backward_grid_is_one_wave_of_resident_blocks():
    # The occupancy rule the backward's grid is sized by (TinyStories' width compiled to 163
    # registers at 4 warps: 3 blocks an SM, where 4 x SMs programs ran 1.33 waves).
    from kernels._utils import blocks_per_sm

    assert blocks_per_sm(163, 0, 4) == 3
    assert blocks_per_sm(32, 0, 4) == 16  # 64 warps an SM at most
    assert blocks_per_sm(32, 0, 1) == 32  # 32 blocks an SM at most
    assert blocks_per_sm(64, 100_000, 4) == 2  # shared memory the limit
    assert blocks_per_sm(255, 0, 16) == 1


def test_rms_norm_rejects_too_wide_rows():
    with pytest.raises(ValueError, match="65536"):
        triton_ops.rms_norm(randn(1, 65537), randn(65537), 1e-5)


def _add_norm(ops, uses):
    # Both outputs used (the stream's gradient joins the norm's), or one of them.
    def fn(x, r, w):
        h, y = ops.add_rms_norm(x, r, w, 1e-5)
        return {"both": lambda: torch.stack([h, y]), "y": lambda: y, "h": lambda: h}[uses]()

    return fn


@pytest.mark.parametrize("uses", ["both", "y"])
@pytest.mark.parametrize("shape", [(1, 3), (3, 5, 37), (130, 512)])
def test_add_rms_norm_forward_and_grads(shape, uses):
    x, r, w = randn(*shape), randn(*shape), randn(shape[-1]) + 1.0
    check_op_against_reference(_add_norm(triton_ops, uses), _add_norm(get_ops("torch"), uses), [x, r, w])


def test_add_rms_norm_with_only_the_stream_used():
    x, r, w = randn(5, 24).requires_grad_(), randn(5, 24).requires_grad_(), randn(24).requires_grad_()
    dh = randn(5, 24)
    triton_ops.add_rms_norm(x, r, w, 1e-5)[0].backward(dh)
    assert torch.equal(x.grad, dh) and torch.equal(r.grad, dh) and w.grad is None


@pytest.mark.parametrize("branch", [torch.bfloat16, torch.float16])
def test_add_rms_norm_fp32_stream_low_precision_branch(branch):
    # The autocast case: fp32 stream x, a bf16 projection output r, the norm's output for the next
    # matmuls in bf16. h stays fp32; r's gradient comes back in r's dtype, written by the kernel.
    x, w = randn(37, 130), randn(130) + 1.0
    r = randn(37, 130).to(branch)
    xl, rl, wl = x.clone().requires_grad_(), r.clone().requires_grad_(), w.clone().requires_grad_()
    h, y = triton_ops.add_rms_norm(xl, rl, wl, 1e-5, branch)
    assert h.dtype == torch.float32 and y.dtype == branch
    dh, dy = randn(37, 130), randn(37, 130).to(branch)
    torch.autograd.backward([h, y], [dh, dy])
    assert xl.grad.dtype == torch.float32 and rl.grad.dtype == branch and wl.grad.dtype == torch.float32
    xr, rr, wr = x.double().requires_grad_(), r.double().requires_grad_(), w.double().requires_grad_()
    hr, yr = reference.add_rms_norm(xr, rr, wr, 1e-5)
    torch.autograd.backward([hr, yr], [dh.double(), dy.double()])
    assert max_err(h, hr) < 1e-6 * hr.abs().max().item()
    assert max_err(y, yr) <= yr.abs().max().item() * 2**-7
    assert max_err(xl.grad, xr.grad) < 1e-5 * xr.grad.abs().max().item() + 1e-6
    assert max_err(rl.grad, rr.grad) <= rr.grad.abs().max().item() * 2**-7  # one rounding to the branch's dtype
    assert max_err(wl.grad, wr.grad) < 1e-5 * wr.grad.abs().max().item() + 1e-6


def test_add_rms_norm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="residual"):
        triton_ops.add_rms_norm(randn(4, 8), randn(1, 8), randn(8), 1e-5)


@pytest.mark.parametrize(
    "x_shape,pos_shape",
    [
        ((7, 10), (7,)),
        ((2, 5, 3, 6), (2, 5, 1)),
        ((2, 3, 9, 64), (9,)),
        ((1, 13, 4, 48), (1, 13, 1)),
        ((3, 1, 2), (3, 1)),
    ],
)
def test_rope_forward_and_grads_arbitrary_positions(x_shape, pos_shape):
    pos = torch.randint(0, 2048, pos_shape, device=DEV)
    check_op_against_reference(triton_ops.rope, reference.rope, [randn(*x_shape), pos, 10000.0])


def test_rope_qk_one_launch_matches_two_calls():
    q, k = randn(2, 11, 4, 32), randn(2, 11, 4, 32)
    pos = torch.randint(0, 500, (2, 11, 1), device=DEV)
    qo, ko = triton_ops.rope_qk(q, k, pos, 500.0)
    torch.testing.assert_close(qo, triton_ops.rope(q, pos, 500.0))
    torch.testing.assert_close(ko, triton_ops.rope(k, pos, 500.0))
    check_op_against_reference(
        lambda a, b, p, th: sum(t.sum() * (i + 1) for i, t in enumerate(triton_ops.rope_qk(a, b, p, th))),
        lambda a, b, p, th: sum(t.sum() * (i + 1) for i, t in enumerate(reference.rope(x, p, th) for x in (a, b))),
        [q, k, pos, 500.0],
        scalar=True,
    )


def test_rope_non_contiguous_view():
    base = randn(2, 9, 8, 16)
    x = base.transpose(1, 2)  # (2, 8, 9, 16) view: rows not uniformly strided -> copied
    pos = torch.arange(9, device=DEV)
    torch.testing.assert_close(triton_ops.rope(x, pos, 100.0), reference.rope(x, pos, 100.0), atol=2e-5, rtol=1e-5)


def test_rope_rejects_float_positions_and_odd_dims():
    with pytest.raises(TypeError):
        triton_ops.rope(randn(3, 4), torch.zeros(3, device=DEV), 10.0)
    with pytest.raises(ValueError, match="even"):
        triton_ops.rope(randn(3, 5), torch.zeros(3, dtype=torch.long, device=DEV), 10.0)


@pytest.mark.parametrize("shape", [(1,), (3, 5, 37), (1000, 3), (2, 2049)])
def test_swiglu_forward_and_grads(shape):
    check_op_against_reference(triton_ops.swiglu, reference.swiglu, [randn(*shape, scale=3), randn(*shape)])


def test_swiglu_non_contiguous_inputs():
    both = randn(10, 2 * 24)
    gate, up = both[:, :24], both[:, 24:]  # halves of one fused projection
    check_op_against_reference(triton_ops.swiglu, reference.swiglu, [gate, up])


@pytest.mark.parametrize("shape", [(1, 2), (3, 5, 74), (1000, 6), (7, 2 * 1344)])
def test_swiglu_packed_forward_and_grads(shape):
    # h = [gate | up] from one matmul; the gradient comes back as one tensor of h's shape.
    check_op_against_reference(triton_ops.swiglu_packed, reference.swiglu_packed, [randn(*shape)])


def test_swiglu_packed_strided_rows_and_bad_width():
    wide = randn(9, 80)
    leaf = wide.clone().requires_grad_()
    h = leaf[:, :74]  # row stride 80: read in place
    dy = randn(9, 37)
    triton_ops.swiglu_packed(h).backward(dy)
    ref = wide.double().requires_grad_()
    out = reference.swiglu_packed(ref[:, :74])
    out.backward(dy.double())
    torch.testing.assert_close(triton_ops.swiglu_packed(h).double(), out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="even"):
        triton_ops.swiglu_packed(randn(3, 7))


def test_rope_qk_reads_views_of_a_packed_projection():
    # q and k unbound from a (B, T, 3, H, D) projection: rows of heads whose token stride is 3 H D.
    qkv = randn(2, 9, 3, 4, 16)
    q, k, _ = qkv.unbind(2)
    pos = torch.randint(0, 500, (2, 9, 1), device=DEV)
    rq, rk = triton_ops.rope_qk(q, k, pos, 10000.0)
    torch.testing.assert_close(rq, reference.rope(q, pos, 10000.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rk, reference.rope(k, pos, 10000.0), atol=1e-5, rtol=1e-5)
    from kernels.rope import _head_rows

    assert _head_rows(q, 4).data_ptr() == q.data_ptr()  # a view, not a copy


def test_ops_register_named_custom_ops():
    for name in (
        "rms_norm_fwd",
        "rms_norm_bwd",
        "add_rms_norm_fwd",
        "add_rms_norm_bwd",
        "rope",
        "rope_qk",
        "swiglu_fwd",
        "swiglu_bwd",
        "swiglu_packed_fwd",
        "swiglu_packed_bwd",
    ):
        assert hasattr(torch.ops.fastlm, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_gpu(dtype):
    x, w = randn(4096, 1024), randn(1024) + 1
    check_op_against_reference(triton_ops.rms_norm, reference.rms_norm, [x, w, 1e-5], dtype=dtype)
    check_op_against_reference(
        _add_norm(triton_ops, "both"), _add_norm(get_ops("torch"), "both"), [x, randn(4096, 1024), w], dtype=dtype
    )
    pos = torch.randint(0, 4096, (8, 256, 1), device=DEV)
    check_op_against_reference(triton_ops.rope, reference.rope, [randn(8, 256, 16, 64), pos, 10000.0], dtype=dtype)
    check_op_against_reference(triton_ops.swiglu, reference.swiglu, [randn(8192, 1344), randn(8192, 1344)], dtype=dtype)
    check_op_against_reference(triton_ops.swiglu_packed, reference.swiglu_packed, [randn(8192, 2 * 1344)], dtype=dtype)


@pytest.mark.gpu
def test_int64_offsets_on_gpu():
    # 2^31 + a bit elements: 32-bit offsets would wrap and write out of bounds.
    n = 2**31 + 4097
    gate = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    out = triton_ops.swiglu(gate, gate)
    assert out[-1].item() == pytest.approx(0.7310586, rel=1e-2)
    del gate, out
    rows = 2**31 // 1024 + 3
    x = torch.ones(rows, 1024, dtype=torch.bfloat16, device="cuda")
    y = triton_ops.rms_norm(x, torch.ones(1024, dtype=torch.bfloat16, device="cuda"), 1e-5)
    assert y[-1].float().mean().item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.gpu
def test_torch_compile_without_graph_breaks():
    from model import ModelConfig, TransformerLM

    cfg = ModelConfig(vocab_size=512, context_length=64, d_model=128, num_layers=2, num_heads=4, d_ff=344)
    m = TransformerLM(cfg, kernels="triton").cuda()
    compiled = torch.compile(m, fullgraph=True)  # raises on any graph break
    x = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_c = compiled(x, targets=x)
        loss_e = m(x, targets=x)
    loss_c.backward()
    assert max_err(loss_c, loss_e) < 1e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
