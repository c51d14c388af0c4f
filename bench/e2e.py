"""End-to-end training-step benchmarks: tokens/s, MFU, peak memory and where the step's time goes.

MFU convention (see ``model.flops``): model FLOPs (6N-style matmul count plus dense attention, no
recompute) per token x tokens/s, over the device's dense bf16 peak, from the datasheet table and
from a bf16 matmul measured on the spot.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from bench.timing import peak_memory_bytes, time_ms
from model import TransformerLM
from model.flops import forward_flops_breakdown, training_flops_per_token, training_memory
from train.config import compile_model, preset
from train.optimizer import AdamW, clip_and_step

COMPONENTS = ("matmul", "attention", "norm", "rope", "swiglu", "loss", "optimizer", "other")

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
    return "other"


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
    """Device milliseconds per step by component, from the profiler's kernel names."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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
    return out


def run_step_benchmark(
    preset_name: str,
    kernels: str,
    device: torch.device,
    compile: bool | str = False,
    batch_size: int | None = None,
    peak_flops: float | None = None,
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
        tokens = b * cfg.context_length
        tok_s = tokens / (ms * 1e-3)
        fpt = training_flops_per_token(cfg)
        est = training_memory(
            cfg,
            b,
            cfg.context_length,
            act_bytes=2 if device.type == "cuda" else 4,
            fused_loss=kernels == "triton",
            flash_attention=kernels == "triton",
        )
        row.update(
            batch_size=b,
            context_length=cfg.context_length,
            ms=ms,
            tokens_per_s=tok_s,
            model_tflops=tok_s * fpt / 1e12,
            mfu=tok_s * fpt / peak_flops if peak_flops else None,
            mfu_measured_peak=tok_s * fpt / measured_peak_flops if measured_peak_flops else None,
            peak_mem_gb=(peak_memory_bytes(step, device) or 0) / 2**30 if device.type == "cuda" else None,
            est_peak_mem_gb=est.total / 2**30,
        )
        if row["peak_mem_gb"]:
            row["mem_estimate_ratio"] = row["est_peak_mem_gb"] / row["peak_mem_gb"]
        if breakdown:
            comp = profile_breakdown(step, device)
            row["breakdown_ms"] = comp
            # Kernel time over step time: well below 100% means the GPU waits for the host (launch
            # overhead: the case for CUDA graphs), not for its own work.
            if device.type == "cuda":
                row["device_busy_pct"] = 100 * sum(comp.values()) / ms
            if kernels == "triton" and device.type == "cuda":
                from kernels.attention import autotuned_configs

                row["attention_autotuned"] = autotuned_configs(cfg.d_model // cfg.num_heads)
            fl = forward_flops_breakdown(cfg, cfg.context_length, b)
            matmul_flops = 3 * (fl["attn_proj"] + fl["ffn"] + fl["lm_head"])
            attn_flops = 3.5 * fl["attn_matmul"] * 0.5  # executed work: causal half, bwd 2.5x
            row["breakdown_tflops"] = {
                "matmul": matmul_flops / (comp["matmul"] * 1e-3) / 1e12 if comp["matmul"] else None,
                "attention": attn_flops / (comp["attention"] * 1e-3) / 1e12 if comp["attention"] else None,
            }
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
