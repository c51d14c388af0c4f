"""``python3 -m bench.warm --shard I --shards N [--tests]``: compile our Triton kernels at the benchmark
shapes (and, with ``--tests``, at the GPU tests' attention shapes) ahead of the benchmarks and tests,
so that their autotuning finds its binaries in Triton's disk cache.

The autotuner compiles its configs one after another (about 1-2 s each for attention, for each new
head dim, causal flag and shape specialisation); the GPU check runs N shards of this beside the GPU
tests, using the machine's other cores. Only compilation is kept: each process autotunes for itself,
so the timings taken here, on a shared GPU, decide nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def warm(shard: int, shards: int, presets: list[str] | None, device: torch.device, quick: bool = False) -> list[str]:
    """Run our backend of every ``shards``-th kernel case (forward, and backward where benchmarked)."""
    from bench.kernel_cases import build_cases, scalarize

    done = []
    cases = [c for c in build_cases(device, quick=quick, presets=presets) if "ours" in c.backends]
    for i, case in enumerate(cases):
        if i % shards != shard:
            continue
        t0 = time.perf_counter()
        inputs = out = None
        try:
            inputs = case.make(device, torch.bfloat16)
            out = scalarize(case.backends["ours"](*inputs))
            if len(case.modes) > 1:
                out.float().sum().backward()
            status = "ok"
        except torch.cuda.OutOfMemoryError:
            status = "out of memory"
        except Exception as e:  # the benchmark reports it properly; here it only costs the warm-up
            status = f"{type(e).__name__}: {str(e)[:120]}"
        finally:
            inputs = out = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done.append(f"{case.op} [{case.shape}]: {status} ({time.perf_counter() - t0:.1f} s)")
    return done


# The GPU tests' attention calls (tests/test_attention_kernel.py: the error-ratio test at T = 1000,
# which is not a multiple of 16, so the benchmark shapes' binaries do not serve it; the long-context
# test; the autotune report test): (B, H, T, D, causal, dtype, backward).
TEST_ATTENTION_SHAPES = (
    [(2, 4, 1000, d, c, torch.bfloat16, True) for d in (32, 64, 128) for c in (True, False)]
    + [(2, 4, 1000, 64, True, torch.float16, True)]
    + [(1, 8, t, 64, True, torch.bfloat16, True) for t in (4096, 8192)]
    + [(1, 2, 512, d, True, torch.bfloat16, True) for d in (64, 128)]
)


def warm_tests(shard: int, shards: int, device: torch.device) -> list[str]:
    """Our attention (forward, and backward where the test runs it) at the GPU tests' shapes."""
    from kernels import get_ops

    attention = get_ops("triton").attention
    done = []
    for i, (b, h, t, d, causal, dtype, backward) in enumerate(TEST_ATTENTION_SHAPES):
        if i % shards != shard:
            continue
        t0 = time.perf_counter()
        try:
            q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
            out = attention(q, k, v, causal=causal)
            if backward:
                out.float().sum().backward()
            status = "ok"
        except Exception as e:  # the test reports it properly
            status = f"{type(e).__name__}: {str(e)[:120]}"
        finally:
            q = k = v = out = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        done.append(
            f"test attention B{b} H{h} T{t} D{d} causal={causal} {dtype}: {status} ({time.perf_counter() - t0:.1f} s)"
        )
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.warm", description=__doc__.split("\n\n")[0])
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument(
        "--presets",
        default=os.environ.get("BENCH_PRESETS", ""),
        help="comma-separated (default: BENCH_PRESETS, else all)",
    )
    p.add_argument("--tests", action="store_true", help="also the GPU tests' attention shapes")
    args = p.parse_args(argv)
    if not 0 <= args.shard < args.shards:
        p.error(f"--shard must be in [0, {args.shards}), got {args.shard}")
    if not torch.cuda.is_available():
        print("bench.warm: no CUDA device; nothing to compile", file=sys.stderr)
        return 0
    presets = [x for x in args.presets.split(",") if x] or None
    for line in warm(args.shard, args.shards, presets, torch.device("cuda")):
        print(line, flush=True)
    if args.tests:
        for line in warm_tests(args.shard, args.shards, torch.device("cuda")):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
