"""The fused AdamW kernel against the foreach AdamW it replaces (interpreter on CPU, real on GPU)."""

import pytest
import torch

from train.optimizer import AdamW

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(shapes, dtype=torch.float32, **kw):
    """Two copies of the same parameters, one under the foreach AdamW and one under the fused."""
    base = [torch.randn(*s, device=DEV).to(dtype) for s in shapes]
    a = [torch.nn.Parameter(t.clone()) for t in base]
    b = [torch.nn.Parameter(t.clone()) for t in base]
    return a, b, AdamW(a, **kw), AdamW(b, fused=True, **kw)


def _step_both(a, b, oa, ob, grad_dtype=None):
    for x, y in zip(a, b):
        g = torch.randn(x.shape, device=DEV)
        x.grad = g.to(grad_dtype or x.dtype)
        y.grad = g.to(grad_dtype or y.dtype)
    oa.step()
    ob.step()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fused_matches_foreach_over_steps(wd):
    # Tensors of 1 element, exact blocks (1024, 2048), ragged tails (1025, 5003), a matrix.
    a, b, oa, ob = _pair(
        [(1,), (1024,), (2048,), (1025,), (5003,), (33, 17)], lr=3e-2, betas=(0.9, 0.95), weight_decay=wd
    )
    for _ in range(4):
        _step_both(a, b, oa, ob)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)  # FMA contraction: a few ulps
            for k in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(ob.state[y][k], oa.state[x][k], atol=1e-7, rtol=1e-5)
    assert all(ob.state[y]["step"] == 4 for y in b)


def test_fused_low_precision_parameters_and_gradients():
    # bf16 parameters with bf16 gradients, and fp32 parameters with bf16 gradients, in one group:
    # one launch per (parameter, gradient) dtype pair; moments fp32; bf16 rounded once.
    a, b, oa, ob = _pair([(300,), (7, 9)], dtype=torch.bfloat16, lr=1e-2)
    for _ in range(3):
        _step_both(a, b, oa, ob)
        for x, y in zip(a, b):
            assert y.dtype == torch.bfloat16 and ob.state[y]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(ob.state[y]["exp_avg_sq"], oa.state[x]["exp_avg_sq"], atol=1e-7, rtol=1e-5)
            # Within one bf16 step of each other (the interpreter rounds fp32 -> bf16 toward zero,
            # a GPU to nearest); then level, so the difference does not compound over steps.
            assert ((y.float() - x.float()).abs() <= x.float().abs() * 2**-7 + 1e-6).all()
            with torch.no_grad():
                y.copy_(x)
    a, b, oa, ob = _pair([(300,), (7, 9)], lr=1e-2)
    if hasattr(a[0], "grad_dtype"):  # newer torch checks a gradient's dtype against the tensor's
        for t in a + b:
            t.grad_dtype = None
    for _ in range(3):
        _step_both(a, b, oa, ob, grad_dtype=torch.bfloat16)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_low_precision_parameters_keep_fp32_moments_through_a_checkpoint(fused):
    # torch's Optimizer.load_state_dict casts state to the parameter's dtype; ours keeps m and v
    # fp32, and both step paths continue from the loaded state.
    p = torch.nn.Parameter(torch.randn(300, device=DEV).bfloat16())
    opt = AdamW([p], lr=1e-2, fused=fused)
    for _ in range(2):
        p.grad = torch.randn(300, device=DEV).bfloat16()
        opt.step()
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = AdamW([q], lr=1e-2, fused=fused)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[q]["exp_avg"].dtype == torch.float32 and opt2.state[q]["exp_avg_sq"].dtype == torch.float32
    g = torch.randn(300, device=DEV).bfloat16()
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    opt2.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("fused", [False, True])
def test_clip_factor_applied_inside_the_step_equals_clipping_first(fused):
    from train.optimizer import clip_grad_norm, grad_norm_and_clip_scale

    a, b, oa, ob = _pair([(500,), (40, 3)], lr=1e-2, weight_decay=0.1)
    ob.fused = fused
    for max_norm in (0.5, 1e6):  # clipping, then a bound the norm stays under (factor 1)
        for x, y in zip(a, b):
            g = torch.randn(x.shape, device=DEV) * 3
            x.grad, y.grad = g.clone(), g.clone()
        norm_a = clip_grad_norm(a, max_norm)
        oa.step()
        norm_b, clip = grad_norm_and_clip_scale([y.grad for y in b], max_norm)
        ob.step(grad_scale=clip)
        torch.testing.assert_close(norm_b, norm_a)
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ob.state[y]["exp_avg"], oa.state[x]["exp_avg"], atol=1e-7, rtol=1e-5)


def test_fused_handles_parameters_at_different_steps_and_without_gradients():
    a, b, oa, ob = _pair([(10,), (20,), (30,)], lr=1e-2)
    a[2].requires_grad_(False)
    b[2].requires_grad_(False)
    _step_both(a[:2], b[:2], oa, ob)  # the third has no gradient: skipped, its step stays 0
    a[2].requires_grad_(True)
    b[2].requires_grad_(True)
    _step_both(a, b, oa, ob)  # now steps 2, 2 and 1: two launches with their own bias corrections
    assert [ob.state[y]["step"] for y in b] == [2, 2, 1]
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_fused_falls_back_for_tensors_it_cannot_address():
    # A non-contiguous parameter: the group takes the foreach passes, with the same result.
    base = torch.randn(8, 6, device=DEV)
    a = torch.nn.Parameter(base.clone().t())
    b = torch.nn.Parameter(base.clone().t())
    assert not b.is_contiguous()
    oa, ob = AdamW([a], lr=1e-2), AdamW([b], lr=1e-2, fused=True)
    _step_both([a], [b], oa, ob)
    torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_fused_kernel_tables_are_reused(monkeypatch):
    from kernels import adamw

    a, b, oa, ob = _pair([(100,), (3000,)], lr=1e-2)
    for _ in range(2):
        _step_both(a, b, oa, ob)
    # One work table (sizes never change); offset tables keyed by where the gradients sit.
    assert len(ob._tables._work) == 1
    launches = []
    real = adamw._adamw_kernel
    monkeypatch.setattr(
        adamw,
        "_adamw_kernel",
        type("K", (), {"__getitem__": lambda self, grid: (launches.append(grid), real[grid])[1]})(),
    )
    _step_both(a, b, oa, ob)
    assert launches == [(1 + 3,)]  # one launch: 1 + 3 blocks of 1024


@pytest.mark.gpu
def test_fused_on_gpu_large_and_without_host_sync():
    a, b, oa, ob = _pair([(3_000_001,), (1024, 1024), (5,)], lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        for x, y in zip(a, b):
            g = torch.randn(x.shape, device="cuda")
            x.grad, y.grad = g.clone(), g.clone()
        oa.step()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the fused step raises
        try:
            ob.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_fused_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="fused=False"):
        AdamW([torch.nn.Parameter(torch.randn(3))], fused=True)
