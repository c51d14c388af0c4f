"""End-to-end training-step benchmarks: tokens/s, MFU, peak memory and where the step's time goes.

MFU convention (see ``model.flops``): model FLOPs (matmuls, attention dense even when causal,
training = 3x forward, no recompute) per token x tokens/s, over the dense peak of the dtype the step
computes in (bf16 under autocast on a GPU, fp32 on the CPU), from the datasheet table
(``DevicePeak.tflops(dtype)``) and, for bf16 steps, from a bf16 matmul measured on the spot.
Per-component TFLOP/s divide hardware FLOPs (what the backend executes: causal skipping and
recompute counted) by the profiled time of that component, and are labelled so.

A step breakdown's parts sum to its total, the wall time of the profiled steps: named components,
``unclassified`` (kernels, or on the CPU aten ops, whose names match no component) and
``unattributed`` (step time in no kernel: host work and launch gaps on a GPU, Python and dispatch
outside aten ops on the CPU).
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from bench.timing import peak_memory_bytes, time_ms
from model import TransformerLM
from model.flops import (
    HARDWARE_FLOPS,
    MODEL_FLOPS,
    training_flops_per_token,
    training_hardware_flops_breakdown,
    training_memory,
)
from train.config import compile_model, preset
from train.devices import DevicePeak
from train.optimizer import AdamW, clip_and_step

NAMED = ("matmul", "attention", "norm", "rope", "swiglu", "loss", "optimizer")
COMPONENTS = (*NAMED, "unclassified", "unattributed")

_PATTERNS = [
    ("attention", ("_attn_", "flash", "fmha", "softmax", "sdpa")),
    ("norm", ("rmsnorm", "rms_norm")),
    ("rope", ("_rope",)),
    ("swiglu", ("_swiglu",)),
    ("loss", ("_ce_fwd", "cross_entropy", "nll_loss", "log_softmax")),
    ("optimizer", ("multi_tensor", "foreach", "lerp", "addcmul", "addcdiv", "_amp_", "_adamw")),
    (
        "matmul",
        ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "hopper", "matmul", "wgmma"),
    ),
]


_CPU_MATMULS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def classify_kernel(name: str) -> str:
    """The step component a GPU kernel (or, on a CPU, an aten op) belongs to, by its name."""
    if name in _CPU_MATMULS:
        return "matmul"
    low = name.lower()
    for comp, keys in _PATTERNS:
        if any(k in low for k in keys):
            return comp
    return "unclassified"


def _compile_mode(compile: bool | str) -> str | None:
    """None (eager), or the torch.compile mode that ``compile`` (False, True or a mode name) asks for."""
    if not compile:
        return None
    return compile if isinstance(compile, str) else "default"


def make_step(
    preset_name: str, kernels: str, device: torch.device, batch_size: int | None = None, compile: bool | str = False
):
    """A training step (forward, backward, clip, AdamW) of a preset's model; ``compile``: False, True
    (torch.compile's default mode) or a mode name from ``train.config.COMPILE_MODES``."""
    model_cfg, run = preset(preset_name)
    b = batch_size or run["batch_size"]
    model = TransformerLM(model_cfg, kernels=kernels).to(device)
    opt = AdamW(model.parameters(), lr=1e-4, fused=kernels == "triton")
    mode = _compile_mode(compile)
    fwd = compile_model(model, mode) if mode else model
    x = torch.randint(0, model_cfg.vocab_size, (b, model_cfg.context_length), device=device)
    y = torch.randint(0, model_cfg.vocab_size, (b, model_cfg.context_length), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        with autocast:
            loss = fwd(x, targets=y)
        loss.backward()
        clip_and_step(opt, 1.0)
        opt.zero_grad(set_to_none=True)

    return step, model_cfg, b


def profile_breakdown(step, device: torch.device, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step by component (``COMPONENTS``), from the profiler's kernel names (aten
    ops' self time on the CPU); they sum to the profiled steps' wall time (profiler overhead
    included), what no kernel accounts for being ``unattributed``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda *_: None
    with profile(activities=activities) as prof:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    out = dict.fromkeys(COMPONENTS, 0.0)
    for evt in prof.key_averages():
        if device.type == "cuda":
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = getattr(evt, "self_cuda_time_total", 0.0)
            if evt.device_type != torch.autograd.DeviceType.CUDA:
                continue
        else:
            us = evt.self_cpu_time_total
            if not evt.key.startswith("aten::") and "fastlm" not in evt.key:
                continue
        out[classify_kernel(evt.key)] += us / 1e3 / steps
    out["unattributed"] = wall_ms - sum(out.values())
    return out


def step_figures(
    cfg, batch_size: int, kernels: str, dtype: str, ms: float, peak: DevicePeak | None, measured_peak_flops=None
) -> dict:
    """Throughput figures of a training step of ``ms`` milliseconds: tokens/s, model TFLOP/s and
    hardware TFLOP/s (``model.flops``), MFU (model FLOPs) over the table's peak for ``dtype``, and
    for bf16 steps over the measured bf16 matmul peak too."""
    b, t = batch_size, cfg.context_length
    tok_s = b * t / (ms * 1e-3)
    model = tok_s * training_flops_per_token(cfg)
    hardware = sum(training_hardware_flops_breakdown(cfg, t, b, kernels.split("+")[0]).values()) / (ms * 1e-3)
    peak_tflops = peak.tflops(dtype) if peak else None
    return {
        "batch_size": b,
        "context_length": t,
        "ms": ms,
        "tokens_per_s": tok_s,
        "model_tflops": model / 1e12,
        "hardware_tflops": hardware / 1e12,
        "flops_conventions": {"model": MODEL_FLOPS, "hardware": HARDWARE_FLOPS},
        "mfu": model / (peak_tflops * 1e12) if peak_tflops else None,
        "mfu_peak": f"{peak.name} dense {dtype} {peak_tflops} TFLOP/s (table)" if peak_tflops else None,
        "mfu_measured_peak": model / measured_peak_flops if measured_peak_flops and dtype == "bf16" else None,
    }


def hardware_tflops_by_component(cfg, batch_size: int, kernels: str, comp_ms: dict[str, float]) -> dict:
    """Hardware TFLOP/s of the matmul and attention components from their profiled milliseconds.
    On the torch backend attention's batched matmuls run as cuBLAS/aten matmuls: they are in the
    matmul component's time and FLOPs, and attention's own figure is None."""
    backend = kernels.split("+")[0]
    hw = training_hardware_flops_breakdown(cfg, cfg.context_length, batch_size, backend)
    matmul = hw["attn_proj"] + hw["ffn"] + hw["lm_head"] + (hw["attn_matmul"] if backend == "torch" else 0.0)
    attention = hw["attn_matmul"] if backend == "triton" else None

    def rate(flops, ms):
        return flops / (ms * 1e-3) / 1e12 if flops and ms else None

    return {"matmul": rate(matmul, comp_ms.get("matmul")), "attention": rate(attention, comp_ms.get("attention"))}


def run_step_benchmark(
    preset_name: str,
    kernels: str,
    device: torch.device,
    compile: bool | str = False,
    batch_size: int | None = None,
    peak: DevicePeak | None = None,
    measured_peak_flops: float | None = None,
    breakdown: bool = True,
    warmup: int = 25,
    rep: int = 100,
) -> dict:
    mode = _compile_mode(compile)
    label = "" if mode is None else ("+compile" if mode == "default" else f"+compile:{mode}")
    row = {
        "kind": "e2e",
        "preset": preset_name,
        "backend": kernels + label,
        "dtype": "bf16" if device.type == "cuda" else "fp32",
    }
    try:
        step, cfg, b = make_step(preset_name, kernels, device, batch_size, compile)
        step()  # compile / autotune outside the timing
        ms = time_ms(step, device, warmup, rep)
        row.update(step_figures(cfg, b, kernels, row["dtype"], ms, peak, measured_peak_flops))
        est = training_memory(cfg, b, cfg.context_length, kernels=kernels, dtype=row["dtype"], device_type=device.type)
        row.update(
            peak_mem_gb=(peak_memory_bytes(step, device) or 0) / 2**30 if device.type == "cuda" else None,
            est_mem_gb=est.total / 2**30,
            est_mem_convention="fp32 params, grads, AdamW m and v + activations saved for the backward; no transients",
        )
        if row["peak_mem_gb"]:
            row["mem_estimate_ratio"] = row["est_mem_gb"] / row["peak_mem_gb"]
        if breakdown:
            comp = profile_breakdown(step, device)
            row["breakdown_ms"] = comp
            row["breakdown_total_ms"] = sum(comp.values())  # the profiled step (profiler overhead included)
            # Kernel time over the (unprofiled) step time: well below 100% means the GPU waits for
            # the host (launch overhead: the case for CUDA graphs), not for its own work.
            if device.type == "cuda":
                row["device_busy_pct"] = 100 * (sum(comp.values()) - comp["unattributed"]) / ms
            if kernels == "triton" and device.type == "cuda":
                from kernels.attention import autotuned_configs

                row["attention_autotuned"] = autotuned_configs(cfg.d_model // cfg.num_heads)
            row["breakdown_hardware_tflops"] = hardware_tflops_by_component(cfg, b, kernels, comp)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row


def largest_batch(preset_name: str, kernels: str, device: torch.device, start: int = 64, limit: int = 4096) -> int:
    """The largest batch (doubling, then bisecting) whose training step fits in device memory."""

    def fits(b: int) -> bool:
        try:
            step, _, _ = make_step(preset_name, kernels, device, b)
            step()
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, start
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit * 2)
    while hi - lo > max(1, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
