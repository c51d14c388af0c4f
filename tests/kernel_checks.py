"""Comparison helpers for kernel tests: tolerances by error ratio, not hand-tuned atol."""

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_error_ratio(out, ref64, ref_same_dtype, ratio=2.0, rel_floor=1e-6, what=""):
    """The kernel's error against the fp64 reference is at most ``ratio`` times that of the torch
    reference run in the kernel's dtype (flash-attention's rule), plus a floor of ``rel_floor`` times
    the reference's magnitude for ops where the low-precision reference happens to be exact."""
    err = max_err(out, ref64)
    base = max_err(ref_same_dtype, ref64)
    scale = ref64.abs().max().item() or 1.0
    assert err <= ratio * base + rel_floor * scale, (
        f"{what}: kernel error {err:.3e} vs torch {base:.3e} (scale {scale:.3e})"
    )


def run_with_grads(fn, inputs, dy):
    """Run fn on leaf copies of inputs, backprop dy; returns (out, grads of the float inputs)."""
    leaves = [
        t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        for t in inputs
    ]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype) if dy is not None else None)
    return out.detach(), [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def check_op_against_reference(
    kernel_fn, ref_fn, inputs, dtype=torch.float32, ratio=2.0, rel_floor=1e-6, scalar=False, ref_lowp_fn=None
):
    """Forward and every input gradient of kernel_fn (in ``dtype``) against ref_fn in fp64; the
    error allowance is that of ``ref_lowp_fn`` (default ref_fn) run in ``dtype``."""

    def cast(dt):
        return [t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]

    # The same upstream gradient for all three runs.
    with torch.no_grad():
        shape = ref_fn(*cast(torch.float64)).shape
    dy = None if scalar else torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref64, g64 = run_with_grads(ref_fn, cast(torch.float64), dy)
    refd, gd = run_with_grads(ref_lowp_fn or ref_fn, cast(dtype), dy)
    out, g = run_with_grads(kernel_fn, cast(dtype), dy)
    assert out.dtype == refd.dtype and out.shape == refd.shape
    assert_error_ratio(out, ref64, refd, ratio, rel_floor, "forward")
    for i, (a, b, c) in enumerate(zip(g, g64, gd)):
        assert a is not None and a.shape == b.shape, f"grad {i} missing or misshapen"
        assert_error_ratio(a, b, c, ratio, rel_floor, f"grad {i}")
