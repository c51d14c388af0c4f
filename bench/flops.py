"""``python -m bench.flops --preset NAME [--seq-len T] [--batch-size B] [--json]``: parameters,
forward matmul model FLOPs by component, training model FLOPs (what MFU counts), the hardware FLOPs
each backend executes, and a training-memory estimate (conventions in ``model.flops``)."""

from __future__ import annotations

import argparse
import json
import sys

from model.flops import (
    HARDWARE_FLOPS,
    MODEL_FLOPS,
    count_parameters,
    forward_flops_breakdown,
    training_flops_per_token,
    training_hardware_flops_breakdown,
    training_memory,
)
from train.config import PRESETS, preset


def flops_report(preset_name: str, seq_len: int | None = None, batch_size: int = 1, fused: bool = True) -> dict:
    cfg, _ = preset(preset_name)
    t = seq_len or cfg.context_length
    if t > cfg.context_length:
        cfg.context_length = t  # longer contexts are a what-if: RoPE covers any length
    breakdown = forward_flops_breakdown(cfg, t, batch_size)
    fwd = sum(breakdown.values())
    kernels = "triton" if fused else "torch"
    mem = training_memory(cfg, batch_size, t, kernels=kernels, dtype="bf16", device_type="cuda")
    hw = {k: sum(training_hardware_flops_breakdown(cfg, t, batch_size, k).values()) for k in ("triton", "torch")}
    return {
        "preset": preset_name,
        "seq_len": t,
        "batch_size": batch_size,
        "params": count_parameters(cfg)["total"],
        "params_breakdown": count_parameters(cfg),
        "model_flops_convention": MODEL_FLOPS,
        "forward_flops": fwd,
        "breakdown": breakdown,
        "breakdown_pct": {k: 100 * v / fwd for k, v in breakdown.items()},
        "training_flops": 3 * fwd,
        "training_flops_per_token": training_flops_per_token(cfg, t),
        "hardware_flops_convention": HARDWARE_FLOPS,
        "training_hardware_flops": hw,
        "memory_estimate_bytes": {
            "params": mem.params,
            "grads": mem.grads,
            "optimizer": mem.optimizer,
            "activations": mem.activations,
            "total": mem.total,
            "activation_terms": mem.activation_terms,
            "assumes": f"the {kernels} backend under bf16 autocast on a GPU: fp32 params, grads and AdamW state; "
            "activations as the backward holds them after the forward (every saved tensor"
            + (", the attention log-sum-exp included" if fused else "")
            + "), transients not counted",
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__)
    p.add_argument("--preset", default="tinystories", choices=list(PRESETS))
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences (default 1)")
    p.add_argument(
        "--unfused",
        action="store_true",
        help="memory estimate for the torch backend (attention scores and logits kept) instead of triton",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(argv)
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        print("error: --batch-size and --seq-len must be positive", file=sys.stderr)
        return 2
    r = flops_report(args.preset, args.seq_len, args.batch_size, fused=not args.unfused)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['preset']}: {r['params']:,} parameters; batch {r['batch_size']} x {r['seq_len']} tokens")
    print(f"forward matmul FLOPs (model FLOPs: attention dense even when causal): {r['forward_flops']:.4g}")
    for k, v in r["breakdown"].items():
        print(f"  {k:<12} {v:.4g}  ({r['breakdown_pct'][k]:.2f}%)")
    print(
        f"training model FLOPs (3x forward, no recompute; what MFU counts): {r['training_flops']:.4g}"
        f"  = {r['training_flops_per_token']:.4g} per token"
    )
    hw = r["training_hardware_flops"]
    print(
        f"training hardware FLOPs (executed): triton {hw['triton']:.4g} (attention causal half, backward "
        f"recomputes scores), torch {hw['torch']:.4g} (attention dense)"
    )
    m = r["memory_estimate_bytes"]
    print(
        "training memory estimate: "
        + ", ".join(f"{k} {m[k] / 2**30:.2f} GiB" for k in ("params", "grads", "optimizer", "activations", "total"))
    )
    print(f"  ({m['assumes']})")
    for k, v in m["activation_terms"].items():
        print(f"  activations: {k:<44} {v / 2**20:10.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
