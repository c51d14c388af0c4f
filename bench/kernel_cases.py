"""Kernel benchmark cases: each op x backend x mode on the presets' shapes.

Bandwidth-bound ops report GB/s against the minimum traffic the op needs (each input read once,
each output written once); attention and the fused LM head report TFLOP/s (attention: 4 B H T^2 D
per forward, halved when causal, 2.5x for the backward; LM head: 2 N d V forward, 4 N d V backward).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.timing import peak_memory_bytes, time_ms
from kernels import get_ops, reference
from kernels._utils import interpreting
from train.optimizer import AdamW

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.device, torch.dtype], list]  # -> inputs (float ones require grad)
    backends: dict[str, Callable]
    work: Callable[[str, int], float]  # (mode, element size) -> bytes or FLOPs
    unit: str  # "GB/s" or "TFLOP/s"
    modes: tuple[str, ...] = MODES
    params: dict = field(default_factory=dict)


def _liger(name: str):
    try:
        import liger_kernel.ops as lo  # noqa: F401
    except ImportError:
        return None
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        if name == "cross_entropy":
            from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

            return lambda logits, t: LigerCrossEntropyFunction.apply(logits, t, None)[0]  # weight has no default
        if name == "linear_cross_entropy":
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            return lambda x, w, t: LigerFusedLinearCrossEntropyFunction.apply(x, w, t)[0]
    except (ImportError, AttributeError):
        return None
    return None


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _with_optional(backends: dict, name: str, fn) -> dict:
    if fn is not None:
        backends[name] = fn
    return backends


# Shapes of the presets: (label, rows = batch x context, d_model, d_ff, heads, head_dim, T, batch, vocab)
PRESET_SHAPES = {
    "tinystories": dict(B=64, T=256, d=512, d_ff=1344, H=16, D=32, V=10000),
    "gpt2-small": dict(B=8, T=1024, d=768, d_ff=3072, H=12, D=64, V=50257),
    "gpt2-xl": dict(B=4, T=1024, d=1600, d_ff=6400, H=25, D=64, V=50257),
}


def build_cases(device: torch.device, quick: bool = False, presets: list[str] | None = None) -> list[Case]:
    """Kernel cases for the given presets' shapes (default all); ``quick`` uses one tiny shape
    (for CPU checks of the harness itself)."""
    # Our kernels on a GPU, or on a CPU through Triton's interpreter (correct there, not fast: the
    # harness test uses it to exercise every mode of every op).
    triton_ops = get_ops("triton") if device.type == "cuda" or interpreting() else None
    if quick:
        presets = {"tiny": dict(B=2, T=16, d=32, d_ff=48, H=2, D=16, V=101)}
    else:
        unknown = set(presets or []) - set(PRESET_SHAPES)
        if unknown:
            raise ValueError(f"unknown benchmark presets {sorted(unknown)}; known: {', '.join(PRESET_SHAPES)}")
        presets = {k: v for k, v in PRESET_SHAPES.items() if presets is None or k in presets}
    cases: list[Case] = []

    def rq(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype).requires_grad_()

    for label, s in presets.items():
        rows = s["B"] * s["T"]
        widths = [s["d"]] + ([4096] if label == "gpt2-small" and not quick else [])
        for n in widths:
            b = {
                "torch": reference.rms_norm,
                "compile": _compiled(reference.rms_norm),
                "builtin": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
            }
            if triton_ops:
                b["ours"] = triton_ops.rms_norm
            _with_optional(b, "liger", _liger("rms_norm"))
            cases.append(
                Case(
                    "rms_norm",
                    f"{label} {rows}x{n}",
                    lambda dev, dt, rows=rows, n=n: [rq(rows, n, dtype=dt), rq(n, dtype=dt), 1e-5],
                    b,
                    lambda mode, e, rows=rows, n=n: {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * rows * n * e,
                    "GB/s",
                )
            )
        b = {"torch": lambda g, u: reference.swiglu(g, u), "compile": _compiled(reference.swiglu)}
        if triton_ops:
            b["ours"] = triton_ops.swiglu
        _with_optional(b, "liger", _liger("swiglu"))
        cases.append(
            Case(
                "swiglu",
                f"{label} {rows}x{s['d_ff']}",
                lambda dev, dt, rows=rows, f=s["d_ff"]: [rq(rows, f, dtype=dt), rq(rows, f, dtype=dt)],
                b,
                lambda mode, e, n=rows * s["d_ff"]: {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * n * e,
                "GB/s",
            )
        )

        def rope_ref(q, k, pos, theta):
            return reference.rope(q, pos, theta), reference.rope(k, pos, theta)

        b = {"torch": rope_ref, "compile": _compiled(rope_ref)}
        if triton_ops:
            b["ours"] = triton_ops.rope_qk
        cases.append(
            Case(
                "rope_qk",
                f"{label} B{s['B']} T{s['T']} H{s['H']} D{s['D']}",
                lambda dev, dt, s=s: [
                    rq(s["B"], s["T"], s["H"], s["D"], dtype=dt),
                    rq(s["B"], s["T"], s["H"], s["D"], dtype=dt),
                    torch.arange(s["T"], device=dev)[:, None],
                    10000.0,
                ],
                b,
                lambda mode, e, r=rows * s["H"] * s["D"]: {"fwd": 4, "bwd": 4, "fwd+bwd": 8}[mode] * r * e,
                "GB/s",
            )
        )
        b = {
            "torch": reference.attention,
            "compile": _compiled(reference.attention),
            "builtin": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        }
        if triton_ops:
            b["ours"] = triton_ops.attention
        cases.append(_attention_case(label, s["B"], s["H"], s["T"], s["D"], b, rq))
        b = {
            "torch": reference.cross_entropy,
            "compile": _compiled(reference.cross_entropy),
            "builtin": lambda logits, t: F.cross_entropy(logits, t),
        }
        if triton_ops:
            b["ours"] = triton_ops.cross_entropy
        _with_optional(b, "liger", _liger("cross_entropy"))
        cases.append(
            Case(
                "cross_entropy",
                f"{label} {rows}x{s['V']}",
                lambda dev, dt, rows=rows, v=s["V"]: [
                    rq(rows, v, dtype=dt, scale=2.0),
                    torch.randint(0, v, (rows,), device=dev),
                ],
                b,
                lambda mode, e, n=rows * s["V"]: {"fwd": 1, "bwd": 2, "fwd+bwd": 2}[mode] * n * e,
                "GB/s",
            )
        )
    if not quick:
        for d in (64, 128):
            b = {
                "torch": reference.attention,
                "builtin": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            }
            if triton_ops:
                b["ours"] = triton_ops.attention
            cases.append(_attention_case("long", 4, 2048 // d, 4096, d, b, rq))  # FA2 paper: 16K tokens, width 2048
        # No (T x T) buffer: T = 16384 runs where the reference runs out of memory.
        b = {"torch": reference.attention}
        if triton_ops:
            b["ours"] = triton_ops.attention
        # B4 H16: the reference's fp32 scores alone are 4 x 16 x 16384^2 x 4 B = 69 GB.
        cases.append(_attention_case("16k", 4, 16, 16384, 64, b, rq, modes=("fwd",)))
        n, d, v = 16384, 768, 50257

        def matmul_ce(x, w, t):
            return F.cross_entropy((x @ w.t()).float(), t)

        b = {"torch": matmul_ce, "compile": _compiled(reference.linear_cross_entropy)}
        if triton_ops:
            b["ours"] = triton_ops.linear_cross_entropy
        _with_optional(b, "liger", _liger("linear_cross_entropy"))
        cases.append(
            Case(
                "linear_cross_entropy",
                f"N{n} d{d} V{v}",
                lambda dev, dt: [
                    rq(n, d, dtype=dt),
                    rq(v, d, dtype=dt, scale=0.02),
                    torch.randint(0, v, (n,), device=dev),
                ],
                b,
                lambda mode, e: {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[mode] * n * d * v,
                "TFLOP/s",
            )
        )
    # Last (a time-limited run measures the ops above first): the model's fused variants. The
    # residual add fused into the norm after it, as in the pre-norm blocks: reads x and r, writes
    # h and y; the backward reads dy, dh and h and writes dx.
    for label, s in presets.items():
        b = {"torch": reference.add_rms_norm, "compile": _compiled(reference.add_rms_norm)}
        if triton_ops:
            b["ours"] = triton_ops.add_rms_norm
        rows = s["B"] * s["T"]
        cases.append(
            Case(
                "add_rms_norm",
                f"{label} {rows}x{s['d']}",
                lambda dev, dt, rows=rows, n=s["d"]: [
                    rq(rows, n, dtype=dt),
                    rq(rows, n, dtype=dt),
                    rq(n, dtype=dt),
                    1e-5,
                ],
                b,
                lambda mode, e, n=rows * s["d"]: {"fwd": 4, "bwd": 4, "fwd+bwd": 8}[mode] * n * e,
                "GB/s",
            )
        )
        # SwiGLU on the packed [gate | up] output of the model's single w1/w3 matmul: the same
        # traffic as the two-input op, its gradient written as one (rows, 2 d_ff) tensor.
        b = {"torch": reference.swiglu_packed, "compile": _compiled(reference.swiglu_packed)}
        if triton_ops:
            b["ours"] = triton_ops.swiglu_packed
        cases.append(
            Case(
                "swiglu_packed",
                f"{label} {rows}x2x{s['d_ff']}",
                lambda dev, dt, rows=rows, f=s["d_ff"]: [rq(rows, 2 * f, dtype=dt)],
                b,
                lambda mode, e, n=rows * s["d_ff"]: {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode] * n * e,
                "GB/s",
            )
        )
    # The optimizer step over a preset's parameters: our fused AdamW, our foreach AdamW (what the
    # torch backend trains with) and PyTorch's own fused AdamW. Minimum traffic: read p, g, m, v
    # and write p, m, v once, fp32.
    for label in presets:
        numels = [4000, 32, 3000, 1] if quick else _param_numels(label)
        b = {
            "torch": _stepper(lambda ps: AdamW(ps, lr=1e-4)),
            "ours": _stepper(lambda ps: AdamW(ps, lr=1e-4, fused=True)),
            "builtin": _stepper(lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        }
        if not triton_ops:
            del b["ours"]
        cases.append(
            Case(
                "adamw",
                f"{label} {sum(numels) / 1e6:.1f}M params in {len(numels)} tensors",
                lambda dev, dt, numels=numels: _params_with_grads(numels, dev),
                b,
                lambda mode, e, n=sum(numels): 7 * n * e,
                "GB/s",
                modes=("fwd",),
            )
        )
    return cases


def _param_numels(preset_name: str) -> list[int]:
    from model import TransformerLM
    from train.config import preset

    cfg, _ = preset(preset_name)
    return [p.numel() for p in TransformerLM(cfg, device="meta").parameters()]


def _params_with_grads(numels: list[int], device: torch.device) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in numels]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _stepper(build):
    """A backend that steps one optimizer built on first call for the given parameters (the case's
    inputs), so timed repeats are steps of a warm optimizer."""
    opts: dict = {}

    def step(*params):
        key = id(params[0])
        if key not in opts:
            opts.clear()  # a new case's parameters: let the last ones go
            opts[key] = build(list(params))
        opts[key].step()

    return step


def _attention_case(label, B, H, T, D, backends, rq, modes=MODES) -> Case:
    flops = 4 * B * H * T * T * D * 0.5  # causal

    return Case(
        "attention",
        f"{label} B{B} H{H} T{T} D{D} causal",
        lambda dev, dt: [rq(B, H, T, D, dtype=dt), rq(B, H, T, D, dtype=dt), rq(B, H, T, D, dtype=dt), True],
        backends,
        lambda mode, e: {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode] * flops,
        "TFLOP/s",
        modes,
    )


def scalarize(out):
    if isinstance(out, tuple):
        return sum(o.float().sum() for o in out)
    return out


def run_case(
    case: Case,
    backend: str,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    peak_bandwidth: float | None,
    peak_flops: float | None,
    warmup: int = 25,
    rep: int = 100,
):
    """Time one (case, backend, mode); returns (result row, the timed callable or None).

    The row has ``error`` set when the backend cannot run the case (out of memory, unsupported)."""
    call = None
    fn = case.backends[backend]
    row = {
        "kind": "kernel",
        "op": case.op,
        "shape": case.shape,
        "backend": backend,
        "mode": mode,
        "dtype": str(dtype).replace("torch.", ""),
    }
    try:
        inputs = case.make(device, dtype)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def forward():
            with torch.no_grad() if mode == "fwd" else torch.enable_grad():
                return fn(*inputs)

        if mode == "fwd":
            call = forward
        else:
            out = scalarize(fn(*inputs))
            grad = torch.randn_like(out) if out.dim() else None

            def backward():
                for t in tensors:
                    t.grad = None
                out.backward(grad, retain_graph=True)

            def both():
                for t in tensors:
                    t.grad = None
                scalarize(fn(*inputs)).backward(grad)

            call = backward if mode == "bwd" else both
        ms = time_ms(call, device, warmup, rep)
        if case.op == "attention" and backend == "ours" and device.type == "cuda":
            from kernels.attention import autotune_timings, autotuned_configs

            # the tuners this mode ran, whose latest tuning was this shape's (cases run one by one)
            keep = {"fwd"} if mode == "fwd" else {"fwd", "bwd_dkdv", "bwd_dq"}
            d = inputs[0].shape[-1]
            row["autotuned"] = {k: v for k, v in autotuned_configs(d).items() if k in keep}
            row["autotune_ms"] = {k: v for k, v in autotune_timings(d).items() if k in keep}
        row["ms"] = ms
        row["peak_mem_mb"] = (peak_memory_bytes(call, device) or 0) / 2**20 if device.type == "cuda" else None
        work = case.work(mode, tensors[0].element_size())
        if case.unit == "GB/s":
            row["gb_s"] = work / (ms * 1e-3) / 1e9
            row["pct_of_peak"] = 100 * row["gb_s"] / peak_bandwidth if peak_bandwidth else None
        else:
            row["tflops"] = work / (ms * 1e-3) / 1e12
            row["pct_of_peak"] = 100 * row["tflops"] / peak_flops if peak_flops else None
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        call = None
        torch.cuda.empty_cache()
    except Exception as e:  # a backend that cannot run a case is a result, not a crash
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        call = None
    return row, call
