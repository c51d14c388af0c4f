"""Kernel benchmark cases: each op x backend x mode on the presets' shapes.

Bandwidth-bound ops report GB/s against the minimum traffic the op needs (each input read once,
each output written once); attention and the fused LM head report TFLOP/s (attention: 4 B H T^2 D
per forward, halved when causal, 2.5x for the backward; LM head: 2 N d V forward, 4 N d V backward).
"""

from __future__ import annotations

import functools
import inspect
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
    backend_modes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a backend's own modes
    convention: str = ""  # how the work is counted, where a reader needs it (attention's FLOPs)

    def modes_of(self, backend: str) -> tuple[str, ...]:
        return self.backend_modes.get(backend, self.modes)


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


def _optional(name: str, fn) -> dict:
    return {name: fn} if fn is not None else {}


# Shapes of the presets: batch, context, d_model, d_ff, heads, head dim, vocab.
PRESET_SHAPES = {
    "tinystories": dict(B=64, T=256, d=512, d_ff=1344, H=16, D=32, V=10000),
    "gpt2-small": dict(B=8, T=1024, d=768, d_ff=3072, H=12, D=64, V=50257),
    "gpt2-xl": dict(B=4, T=1024, d=1600, d_ff=6400, H=25, D=64, V=50257),
}
TINY = {"tiny": dict(B=2, T=16, d=32, d_ff=48, H=2, D=16, V=101)}

ATTENTION_CONVENTION = (
    "model FLOPs: 4 B H T^2 D a forward (QK^T and PV), halved when causal; backward 2.5x the forward; no recompute"
)


@dataclass(frozen=True)
class OpTable:
    """One op's benchmark cases, as data: its shapes, inputs, backends and the work each mode does.

    ``shapes(presets, quick)`` -> one dict per case (the preset's dims plus a ``label``);
    ``inputs(s, rq, device)`` -> the case's inputs (``rq(*shape, scale=)`` makes a float input that
    requires grad); ``work[mode] * size(s)`` is the case's bytes (times the element size) or FLOPs;
    ``backends(ours)`` -> name -> callable, ``ours`` being the triton op namespace or None."""

    op: str
    shapes: Callable[[dict, bool], list[dict]]
    label: Callable[[dict], str]
    inputs: Callable[[dict, Callable, torch.device], list]
    size: Callable[[dict], float]
    work: dict[str, float]
    backends: Callable[[object], dict]
    unit: str = "GB/s"
    modes: tuple[str, ...] = MODES
    backend_modes: Callable[[object], dict] = lambda ours: {}
    convention: str = ""
    bytes_per_element: bool = True  # work counts elements (GB/s); False: FLOPs


def _per_preset(extra=lambda label, s: {}):
    """Shapes: one per preset (the preset's dims), with ``extra`` updating or adding fields."""

    def shapes(presets, quick):
        return [{**s, "label": label, **extra(label, s)} for label, s in presets.items()]

    return shapes


def _fixed(*shapes: dict):
    """Shapes independent of the presets (long-context attention, the fused head), left out when quick."""
    return lambda presets, quick: [] if quick else list(shapes)


def _rows(s):
    return s["B"] * s["T"]


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _rope_ref(q, k, pos, theta):
    return reference.rope(q, pos, theta), reference.rope(k, pos, theta)


def _matmul_ce(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t)


def _ours(ours, name: str) -> dict:
    return {"ours": getattr(ours, name)} if ours is not None else {}


def _nondeterministic_attention(ours):
    """Our attention's backward with ``deterministic=False``, where the kernel takes that argument."""
    if ours is None:
        return {}
    try:
        if "deterministic" not in inspect.signature(ours.attention).parameters:
            return {}
    except (TypeError, ValueError):
        return {}
    return {"ours-nondet": lambda q, k, v, causal: ours.attention(q, k, v, causal=causal, deterministic=False)}


def _attention_table(op_shapes, backends, modes=MODES) -> OpTable:
    return OpTable(
        "attention",
        op_shapes,
        lambda s: f"{s['label']} B{s['B']} H{s['H']} T{s['T']} D{s['D']} causal",
        lambda s, rq, dev: [rq(s["B"], s["H"], s["T"], s["D"]) for _ in range(3)] + [True],
        lambda s: 4 * s["B"] * s["H"] * s["T"] ** 2 * s["D"] * 0.5,  # causal
        {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5},
        lambda ours: {**backends, **_ours(ours, "attention"), **_nondeterministic_attention(ours)},
        unit="TFLOP/s",
        modes=modes,
        # the non-deterministic variant differs only in its backward
        backend_modes=lambda ours: {"ours-nondet": tuple(m for m in modes if m != "fwd")},
        convention=ATTENTION_CONVENTION,
        bytes_per_element=False,
    )


# In this order (a time-limited run measures the first ones first). Bandwidth-bound work is the
# minimum traffic: each input read once, each output written once (elements; times the element size).
OP_TABLES: list[OpTable] = [
    OpTable(
        "rms_norm",
        lambda presets, quick: [
            {"label": label, "rows": _rows(s), "n": n}
            for label, s in presets.items()
            for n in [s["d"]] + ([4096] if label == "gpt2-small" and not quick else [])
        ],
        lambda s: f"{s['label']} {s['rows']}x{s['n']}",
        lambda s, rq, dev: [rq(s["rows"], s["n"]), rq(s["n"]), 1e-5],
        lambda s: s["rows"] * s["n"],
        {"fwd": 2, "bwd": 3, "fwd+bwd": 5},
        lambda ours: {
            "torch": reference.rms_norm,
            "compile": _compiled(reference.rms_norm),
            "builtin": lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps),
            **_ours(ours, "rms_norm"),
            **_optional("liger", _liger("rms_norm")),
        },
    ),
    OpTable(
        "swiglu",
        _per_preset(),
        lambda s: f"{s['label']} {_rows(s)}x{s['d_ff']}",
        lambda s, rq, dev: [rq(_rows(s), s["d_ff"]), rq(_rows(s), s["d_ff"])],
        lambda s: _rows(s) * s["d_ff"],
        {"fwd": 3, "bwd": 5, "fwd+bwd": 8},
        lambda ours: {
            "torch": reference.swiglu,
            "compile": _compiled(reference.swiglu),
            **_ours(ours, "swiglu"),
            **_optional("liger", _liger("swiglu")),
        },
    ),
    OpTable(
        "rope_qk",
        _per_preset(),
        lambda s: f"{s['label']} B{s['B']} T{s['T']} H{s['H']} D{s['D']}",
        lambda s, rq, dev: [
            rq(s["B"], s["T"], s["H"], s["D"]),
            rq(s["B"], s["T"], s["H"], s["D"]),
            torch.arange(s["T"], device=dev)[:, None],
            10000.0,
        ],
        lambda s: _rows(s) * s["H"] * s["D"],
        {"fwd": 4, "bwd": 4, "fwd+bwd": 8},
        lambda ours: {"torch": _rope_ref, "compile": _compiled(_rope_ref), **_ours(ours, "rope_qk")},
    ),
    _attention_table(
        _per_preset(),
        {"torch": reference.attention, "compile": _compiled(reference.attention), "builtin": _sdpa},
    ),
    # Forward and backward together only: our forward writes the gradient as it goes and the
    # backward only scales it, so either alone measures part of the work. Read logits, write grad.
    OpTable(
        "cross_entropy",
        _per_preset(),
        lambda s: f"{s['label']} {_rows(s)}x{s['V']}",
        lambda s, rq, dev: [rq(_rows(s), s["V"], scale=2.0), torch.randint(0, s["V"], (_rows(s),), device=dev)],
        lambda s: _rows(s) * s["V"],
        {"fwd+bwd": 2},
        lambda ours: {
            "torch": reference.cross_entropy,
            "compile": _compiled(reference.cross_entropy),
            "builtin": lambda logits, t: F.cross_entropy(logits, t),
            **_ours(ours, "cross_entropy"),
            **_optional("liger", _liger("cross_entropy")),
        },
        modes=("fwd+bwd",),
    ),
    # FA2 paper's shapes: 16K tokens, width 2048.
    _attention_table(
        _fixed(*({"label": "long", "B": 4, "H": 2048 // d, "T": 4096, "D": d} for d in (64, 128))),
        {"torch": reference.attention, "builtin": _sdpa},
    ),
    # No (T x T) buffer: T = 16384 runs where the reference runs out of memory (B4 H16: its fp32
    # scores alone are 4 x 16 x 16384^2 x 4 B = 69 GB).
    _attention_table(
        _fixed({"label": "16k", "B": 4, "H": 16, "T": 16384, "D": 64}), {"torch": reference.attention}, modes=("fwd",)
    ),
    OpTable(
        "linear_cross_entropy",
        _fixed({"N": 16384, "d": 768, "V": 50257}),
        lambda s: f"N{s['N']} d{s['d']} V{s['V']}",
        lambda s, rq, dev: [
            rq(s["N"], s["d"]),
            rq(s["V"], s["d"], scale=0.02),
            torch.randint(0, s["V"], (s["N"],), device=dev),
        ],
        lambda s: s["N"] * s["d"] * s["V"],
        {"fwd+bwd": 6},  # 2 N d V forward, 4 N d V backward
        lambda ours: {
            "torch": _matmul_ce,
            "compile": _compiled(reference.linear_cross_entropy),
            **_ours(ours, "linear_cross_entropy"),
            **_optional("liger", _liger("linear_cross_entropy")),
        },
        unit="TFLOP/s",
        modes=("fwd+bwd",),
        convention="2 N d V forward (logits), 4 N d V backward (dx, dW)",
        bytes_per_element=False,
    ),
    # The model's fused variants. The residual add fused into the norm after it, as in the pre-norm
    # blocks: reads x and r, writes h and y; the backward reads dy, dh and h and writes dx.
    OpTable(
        "add_rms_norm",
        _per_preset(),
        lambda s: f"{s['label']} {_rows(s)}x{s['d']}",
        lambda s, rq, dev: [rq(_rows(s), s["d"]), rq(_rows(s), s["d"]), rq(s["d"]), 1e-5],
        lambda s: _rows(s) * s["d"],
        {"fwd": 4, "bwd": 4, "fwd+bwd": 8},
        lambda ours: {
            "torch": reference.add_rms_norm,
            "compile": _compiled(reference.add_rms_norm),
            **_ours(ours, "add_rms_norm"),
        },
    ),
    # SwiGLU on the packed [gate | up] output of the model's single w1/w3 matmul: the same traffic
    # as the two-input op, its gradient written as one (rows, 2 d_ff) tensor.
    OpTable(
        "swiglu_packed",
        _per_preset(),
        lambda s: f"{s['label']} {_rows(s)}x2x{s['d_ff']}",
        lambda s, rq, dev: [rq(_rows(s), 2 * s["d_ff"])],
        lambda s: _rows(s) * s["d_ff"],
        {"fwd": 3, "bwd": 5, "fwd+bwd": 8},
        lambda ours: {
            "torch": reference.swiglu_packed,
            "compile": _compiled(reference.swiglu_packed),
            **_ours(ours, "swiglu_packed"),
        },
    ),
    # The optimizer step over a preset's parameters: our fused AdamW, our foreach AdamW (what the
    # torch backend trains with) and PyTorch's own fused AdamW. Read p, g, m, v and write p, m, v
    # once, fp32 (the parameters are fp32 whatever the case's dtype).
    OpTable(
        "adamw",
        lambda presets, quick: [
            {"label": label, "numels": [4000, 32, 3000, 1] if quick else _param_numels(label)} for label in presets
        ],
        lambda s: f"{s['label']} {sum(s['numels']) / 1e6:.1f}M params in {len(s['numels'])} tensors",
        lambda s, rq, dev: _params_with_grads(s["numels"], dev),
        lambda s: sum(s["numels"]),
        {"fwd": 7},
        lambda ours: {
            "torch": _stepper(lambda ps: AdamW(ps, lr=1e-4)),
            **({"ours": _stepper(lambda ps: AdamW(ps, lr=1e-4, fused=True))} if ours is not None else {}),
            "builtin": _stepper(lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True)),
        },
        modes=("fwd",),
    ),
]


def build_cases(
    device: torch.device, quick: bool = False, presets: list[str] | None = None, errors: list[str] | None = None
) -> list[Case]:
    """Kernel cases of ``OP_TABLES`` for the given presets' shapes (default all); ``quick`` uses one
    tiny shape (for CPU checks of the harness itself). A table that fails to build is left out, its
    error appended to ``errors`` (when given; else raised), so one broken op costs only its rows."""
    # Our kernels on a GPU, or on a CPU through Triton's interpreter (correct there, not fast: the
    # harness test uses it to exercise every mode of every op).
    ours = get_ops("triton") if device.type == "cuda" or interpreting() else None
    if quick:
        chosen = TINY
    else:
        unknown = set(presets or []) - set(PRESET_SHAPES)
        if unknown:
            raise ValueError(f"unknown benchmark presets {sorted(unknown)}; known: {', '.join(PRESET_SHAPES)}")
        chosen = {k: v for k, v in PRESET_SHAPES.items() if presets is None or k in presets}
    cases: list[Case] = []
    for table in OP_TABLES:
        try:
            cases.extend(_table_cases(table, chosen, quick, ours))
        except Exception as e:
            if errors is None:
                raise
            errors.append(f"{table.op}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return cases


def _table_cases(table: OpTable, presets: dict, quick: bool, ours) -> list[Case]:
    backends = table.backends(ours)
    backend_modes = table.backend_modes(ours)
    out = []
    for s in table.shapes(presets, quick):

        def make(dev, dt, s=s):
            def rq(*shape, scale=1.0):
                return (torch.randn(*shape, device=dev, dtype=torch.float32) * scale).to(dt).requires_grad_()

            return table.inputs(s, rq, dev)

        def work(mode, e, s=s):
            return table.work[mode] * table.size(s) * (e if table.bytes_per_element else 1)

        out.append(
            Case(
                table.op,
                table.label(s),
                make,
                dict(backends),
                work,
                table.unit,
                table.modes,
                params=dict(s),
                backend_modes={b: m for b, m in backend_modes.items() if b in backends},
                convention=table.convention,
            )
        )
    return out


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


def scalarize(out):
    if isinstance(out, tuple):
        return sum(o.float().sum() for o in out)
    return out


def timed_callable(fn, inputs: list, tensors: list[torch.Tensor], mode: str):
    """What one timed call of ``mode`` runs: the forward ("fwd"), the backward of one kept
    forward ("bwd", the graph retained), or both ("fwd+bwd")."""

    def forward():
        with torch.no_grad() if mode == "fwd" else torch.enable_grad():
            return fn(*inputs)

    if mode == "fwd":
        return forward
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

    return backward if mode == "bwd" else both


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
    if case.convention:
        row["convention"] = case.convention
    try:
        inputs = case.make(device, dtype)
        tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        call = timed_callable(fn, inputs, tensors, mode)
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
