"""Flash attention (Triton) against the fp64 reference; memory and long-T checks on GPU."""

import pytest
import torch
from kernel_checks import check_op_against_reference, max_err

from kernels import get_ops, reference

triton_ops = get_ops("triton")
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,d", [(1, 32), (45, 32), (130, 64), (33, 24), (17, 128)])
def test_attention_forward_and_grads(t, d, causal):
    q, k, v = (torch.randn(1, 2, t, d, device=DEV) for _ in range(3))
    check_op_against_reference(
        lambda q, k, v: triton_ops.attention(q, k, v, causal=causal),
        lambda q, k, v: reference.attention(q, k, v, causal=causal),
        [q, k, v],
    )


@pytest.mark.skipif(GPU, reason="sets the interpreter's tiles; on a GPU the autotuner's configs run")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "fwd_blocks,bwd_blocks",
    # ratios of the GPU configs: dK/dV 32x128 (1:4), dQ 128x32 (4:1), forward 128x128 and 128x32
    [((32, 16), (16, 32)), ((32, 16), (32, 16)), ((16, 16), (16, 64)), ((64, 16), (64, 16))],
)
def test_attention_with_unequal_tiles(monkeypatch, fwd_blocks, bwd_blocks, causal):
    # The GPU configs use BLOCK_M != BLOCK_N (128x64, 32x128, 64x32...): the diagonal band's and the
    # tail's bounds must hold for those too, with T cutting through blocks of either size.
    from kernels import attention as attn

    monkeypatch.setattr(attn, "_INTERP_FWD_BLOCKS", dict(zip(("BLOCK_M", "BLOCK_N"), fwd_blocks)))
    monkeypatch.setattr(attn, "_INTERP_BWD_BLOCKS", dict(zip(("BLOCK_M", "BLOCK_N"), bwd_blocks)))
    for t in (40, 77):
        q, k, v = (torch.randn(1, 2, t, 16, device=DEV) for _ in range(3))
        check_op_against_reference(
            lambda q, k, v: triton_ops.attention(q, k, v, causal=causal),
            lambda q, k, v: reference.attention(q, k, v, causal=causal),
            [q, k, v],
        )


def test_attention_backward_stays_finite_for_very_negative_scores():
    # Rows whose scores are all far below zero: lse is very negative, so a key past T (loaded as
    # zeros) would get p = exp2(-lse) = inf unless the tail block masks it.
    u = torch.nn.functional.normalize(torch.randn(16, device=DEV), dim=0)
    q = 30 * u + 0.1 * torch.randn(1, 1, 45, 16, device=DEV)
    k = -30 * u + 0.1 * torch.randn(1, 1, 45, 16, device=DEV)  # every score near -900 / 4
    v = torch.randn(1, 1, 45, 16, device=DEV)
    for causal in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        triton_ops.attention(qq, kk, vv, causal=causal).sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (qq, kk, vv))
        qr, kr, vr = (t.double().clone().requires_grad_() for t in (q, k, v))
        reference.attention(qr, kr, vr, causal=causal).sum().backward()
        assert max_err(qq.grad, qr.grad) < 1e-3 * qr.grad.abs().max().item() + 1e-4


def test_attention_reads_strided_views_in_place():
    # The model's layout: (B, T, H, D) projections viewed as (B, H, T, D).
    q, k, v = (torch.randn(2, 19, 3, 16, device=DEV).transpose(1, 2) for _ in range(3))
    out = triton_ops.attention(q, k, v)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, reference.attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_is_deterministic():
    q, k, v = (torch.randn(1, 2, 70, 32, device=DEV, requires_grad=True) for _ in range(3))
    do = torch.randn(1, 2, 70, 32, device=DEV)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        triton_ops.attention(q, k, v).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_attention_bad_input():
    q = torch.randn(1, 2, 8, 16, device=DEV)
    with pytest.raises(ValueError):
        triton_ops.attention(q, q[:, :1], q)
    with pytest.raises(TypeError):
        triton_ops.attention(q, q.double(), q)


def test_flop_counter_sees_attention():
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v = (torch.randn(1, 2, 16, 8, device=DEV) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        triton_ops.attention(q, k, v)
    assert fc.get_total_flops() == 4 * 1 * 2 * 16 * 16 * 8


def attention_same_dtype(q, k, v, causal=True):
    """Attention computed in the inputs' dtype (matmuls in bf16/fp16, softmax in fp32), the
    baseline flash-attention's tests allow twice the error of."""
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        t = q.shape[-2]
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,d,causal",
    # bf16 everywhere; fp16 once (each combination autotunes and compiles its own kernels)
    [(torch.bfloat16, d, c) for d in (32, 64, 128) for c in (True, False)] + [(torch.float16, 64, True)],
)
def test_attention_low_precision_error_ratio(dtype, d, causal):
    q, k, v = (torch.randn(2, 4, 1000, d, device="cuda") for _ in range(3))
    check_op_against_reference(
        lambda q, k, v: triton_ops.attention(q, k, v, causal=causal),
        lambda q, k, v: reference.attention(q, k, v, causal=causal),
        [q, k, v],
        dtype=dtype,
        ref_lowp_fn=lambda q, k, v: attention_same_dtype(q, k, v, causal),
    )


@pytest.mark.gpu
def test_attention_long_context_and_linear_memory():
    peaks = {}
    for t in (4096, 8192):
        q, k, v = (torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        triton_ops.attention(q, k, v).sum().backward()
        torch.cuda.synchronize()
        peaks[t] = torch.cuda.max_memory_allocated() - base
        assert torch.isfinite(q.grad).all()
        del q, k, v
    # Linear in T: doubling T at most about doubles the extra memory (a T x T buffer would quadruple it).
    assert peaks[8192] <= 2.2 * peaks[4096]
    q, k, v = (torch.randn(1, 2, 8192, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = reference.attention(q.float(), k.float(), v.float())
    assert max_err(triton_ops.attention(q, k, v), ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_nondeterministic_backward_low_precision_error_ratio(d):
    q, k, v = (torch.randn(2, 4, 1000, d, device="cuda") for _ in range(3))
    check_op_against_reference(
        lambda q, k, v: triton_ops.attention(q, k, v, causal=True, deterministic=False),
        lambda q, k, v: reference.attention(q, k, v, causal=True),
        [q, k, v],
        dtype=torch.bfloat16,
        ref_lowp_fn=lambda q, k, v: attention_same_dtype(q, k, v, True),
    )


@pytest.mark.gpu
def test_autotuned_tiles_are_reported_per_head_dim():
    from kernels.attention import _bwd_configs, _device_family, _fwd_configs, autotune_timings, autotuned_configs

    def tile(c):
        return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"

    for d, large in ((64, False), (128, True)):
        q, k, v = (torch.randn(1, 2, 512, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        triton_ops.attention(q, k, v).sum().backward()
        chosen, fam = autotuned_configs(d), _device_family()  # the autotuners prune to the device's family
        assert chosen["fwd"] in {tile(c) for c in _fwd_configs(large, fam)}
        assert chosen["bwd_dkdv"] in {tile(c) for c in _bwd_configs(large, "dkdv", fam)}
        assert chosen["bwd_dq"] in {tile(c) for c in _bwd_configs(large, "dq", fam)}
        timings = autotune_timings(d)
        assert set(timings["fwd"]) == {tile(c) for c in _fwd_configs(large, fam)}
        assert set(timings["bwd_dq"]) == {tile(c) for c in _bwd_configs(large, "dq", fam)}
        assert timings["fwd"][chosen["fwd"]] == min(timings["fwd"].values())


def test_autotune_records_name_tiles_and_timings(monkeypatch):
    # What the benchmarks record from the autotuners (filled here by hand: no GPU to tune on).
    from kernels import attention as attn

    fwd = attn._fwd_tuned[False]
    cfgs = attn._fwd_configs(False)
    monkeypatch.setattr(fwd, "configs_timings", {cfgs[0]: [0.5, 0.4, 0.6], cfgs[1]: [float("inf")] * 3}, raising=False)
    monkeypatch.setattr(fwd, "best_config", cfgs[0], raising=False)
    assert attn.autotuned_configs(64)["fwd"] == "128x64 w8 s3"
    assert attn.autotune_timings(64)["fwd"] == {"128x64 w8 s3": 0.5, "128x64 w4 s2": float("inf")}
    assert "fwd" not in attn.autotune_timings(128)  # head dim 128 has its own tuners


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,d", [(45, 32), (70, 64), (37, 128)])
def test_nondeterministic_backward_matches_reference(t, d, causal):
    # deterministic=False: one pass over key blocks, dQ added by fp32 atomics (5 matmul units).
    q, k, v = (torch.randn(1, 2, t, d, device=DEV) for _ in range(3))
    check_op_against_reference(
        lambda q, k, v: triton_ops.attention(q, k, v, causal=causal, deterministic=False),
        lambda q, k, v: reference.attention(q, k, v, causal=causal),
        [q, k, v],
    )


@pytest.mark.skipif(GPU, reason="sets the interpreter's tiles; on a GPU the autotuner's configs run")
@pytest.mark.parametrize("dq_t", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_nondeterministic_backward_with_gpu_shaped_tiles(monkeypatch, dq_t, causal):
    # The fused configs' shapes (BLOCK_M < BLOCK_N, as 32x128 and 32x64), dQ transposed (Hopper) or
    # not (sm_120), T cutting through blocks of both sizes.
    from kernels import attention as attn

    monkeypatch.setattr(attn, "_INTERP_BWD_BLOCKS", {"BLOCK_M": 16, "BLOCK_N": 32})
    monkeypatch.setattr(attn, "_INTERP_DQ_T", dq_t)
    q, k, v = (torch.randn(1, 2, 77, 16, device=DEV) for _ in range(3))
    check_op_against_reference(
        lambda q, k, v: triton_ops.attention(q, k, v, causal=causal, deterministic=False),
        lambda q, k, v: reference.attention(q, k, v, causal=causal),
        [q, k, v],
    )


def test_deterministic_flag_is_accepted_by_both_backends():
    q = torch.randn(1, 1, 9, 16, device=DEV)
    ref = reference.attention(q, q, q)
    assert torch.equal(reference.attention(q, q, q, causal=True, deterministic=False), ref)
    torch.testing.assert_close(get_ops("torch").attention(q, q, q, deterministic=False), ref)
    torch.testing.assert_close(triton_ops.attention(q, q, q, deterministic=False), ref, atol=1e-5, rtol=1e-5)
