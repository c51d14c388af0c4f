"""``python -m bench.flops --preset NAME [--seq-len T] [--batch-size B] [--json]``: parameters,
forward matmul FLOPs by component, training FLOPs and a peak-memory estimate (conventions in
``model.flops``)."""

from __future__ import annotations

import argparse
import json
import sys

from model.flops import count_parameters, forward_flops_breakdown, training_flops_per_token, training_memory
from train.config import PRESETS, preset


def flops_report(preset_name: str, seq_len: int | None = None, batch_size: int = 1, fused: bool = True) -> dict:
    cfg, _ = preset(preset_name)
    t = seq_len or cfg.context_length
    if t > cfg.context_length:
        cfg.context_length = t  # longer contexts are a what-if: RoPE covers any length
    breakdown = forward_flops_breakdown(cfg, t, batch_size)
    fwd = sum(breakdown.values())
    mem = training_memory(cfg, batch_size, t, fused_loss=fused, flash_attention=fused)
    return {
        "preset": preset_name,
        "seq_len": t,
        "batch_size": batch_size,
        "params": count_parameters(cfg)["total"],
        "params_breakdown": count_parameters(cfg),
        "forward_flops": fwd,
        "breakdown": breakdown,
        "breakdown_pct": {k: 100 * v / fwd for k, v in breakdown.items()},
        "training_flops": 3 * fwd,
        "training_flops_per_token": training_flops_per_token(cfg, t),
        "memory_estimate_bytes": {
            "params": mem.params,
            "grads": mem.grads,
            "optimizer": mem.optimizer,
            "activations": mem.activations,
            "total": mem.total,
            "assumes": "fp32 params/grads/AdamW state, bf16 activations, "
            + ("flash attention and the fused LM-head loss" if fused else "materialised attention scores and logits"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__)
    p.add_argument("--preset", default="tinystories", choices=list(PRESETS))
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences (default 1)")
    p.add_argument(
        "--unfused", action="store_true", help="memory estimate for the torch reference (logits and scores kept)"
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
    print(f"forward matmul FLOPs: {r['forward_flops']:.4g}")
    for k, v in r["breakdown"].items():
        print(f"  {k:<12} {v:.4g}  ({r['breakdown_pct'][k]:.2f}%)")
    print(f"training FLOPs (3x forward): {r['training_flops']:.4g}  = {r['training_flops_per_token']:.4g} per token")
    m = r["memory_estimate_bytes"]
    print(
        "peak training memory estimate: "
        + ", ".join(f"{k} {m[k] / 2**30:.2f} GiB" for k in ("params", "grads", "optimizer", "activations", "total"))
    )
    print(f"  ({m['assumes']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
