"""``python -m kernels.compile_check``: compile every Triton kernel, in the configurations the
launchers and autotuners use, for Hopper (sm_90) and the RTX 5090 (sm_120), on a machine without a
GPU (Triton ships ptxas), and check each one's shared memory against the device's per-block limit.
Registers and spilled bytes per thread are printed beside it, and what the compiled code runs:
widest global load/store, cp.async copies, pipeline depth (buffers of the deepest multi-buffered
tile), TMA bulk copies, wgmma waits with nothing left in flight ("waits0": the MMA does not overlap
what follows), and the MMA kind (wgmma / mma.sync) with its instruction count against the minimum
for the tile (more means a product some warps compute twice). ``--kernel NAME`` compiles a subset.

This catches what the CPU interpreter cannot: lowering errors, configs that would not fit one of
the two architectures the kernels promise to run on, and tiles too large for the register file.
Run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# Per-block shared memory available to a kernel (opt-in maximum), bytes.
SHARED_LIMIT = {90: 232_448, 120: 101_376}
ARCH_NAME = {90: "sm_90 (H100/H200)", 120: "sm_120 (RTX 5090)"}

# Integer arguments compiled as multiples of 16, as Triton's JIT specializes them when they are (it
# does so for every pointer and int argument): strides and sizes are at the presets' shapes
# (widths 512..4096, d_ff F 1344 and 3072, T 256 and 1024, head dim 32..128), and the cross-entropy
# kernel's row width V is one at 10,000 and 32,000 and, padded by the fused head, at GPT-2's 50,257.
# Not ignore_index or head counts, which compile as plain ints.
DIVISIBLE_INTS = {"M", "N", "numel", "V", "T", "R", "HALF", "F"}
MODULES = ("rms_norm", "rope", "swiglu", "attention", "cross_entropy", "adamw")


def _cases(only: str | None = None) -> list[dict]:
    """Every module's declared configurations (``compile_cases()`` beside its kernels), or those
    whose kernel name contains ``only``."""
    import importlib

    cases = [c for m in MODULES for c in importlib.import_module(f"kernels.{m}").compile_cases()]
    return [c for c in cases if only is None or only in c["kernel"]]


def _params(fn) -> list[tuple[str, bool]]:
    """(name, is constexpr) of a @triton.jit kernel's arguments (also under TRITON_INTERPRET)."""
    if hasattr(fn, "params"):
        return [(p.name, bool(p.is_constexpr)) for p in fn.params]
    import inspect

    import triton.language as tl

    sig = inspect.signature(fn.fn)
    return [(n, p.annotation is tl.constexpr or p.annotation == "tl.constexpr") for n, p in sig.parameters.items()]


def _signature(fn, case: dict) -> dict:
    """Triton signature from the case's declared pointer types and fp32 scalars; other runtime
    arguments are i32. A declared name the kernel does not take is an error."""
    pointers, floats = case["pointers"], case.get("floats", set())
    params = _params(fn)
    unknown = (set(pointers) | set(floats)) - {n for n, _ in params}
    if unknown:
        raise ValueError(f"{case['kernel']}: declared arguments it does not take: {sorted(unknown)}")
    sig = {}
    for n, is_constexpr in params:
        if is_constexpr:
            sig[n] = "constexpr"
        elif n in pointers:
            sig[n] = f"*{pointers[n]}"
        elif n in floats:
            sig[n] = "fp32"
        elif n.endswith(("_ptr", "_base")):
            raise ValueError(f"{case['kernel']}: pointer argument {n} has no declared dtype")
        else:
            sig[n] = "i32"
    return sig


def resource_usage(cubin: bytes) -> tuple[int, int] | None:
    """(registers per thread, stack bytes per thread) of a compiled kernel, read with the cuobjdump
    Triton ships; None when it is missing. Stack bytes are register spills (local-memory traffic),
    or a local array of a libdevice routine: sin/cos keep 32 bytes for their rarely taken
    huge-argument path, which is the RoPE kernel's 32."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def widest_global_access(ptx: str, op: str = "ld") -> int:
    """Bits per thread of the widest global load (``op`` "ld") or store ("st") in the PTX: 128 is a
    16-byte vector; 16 means one bf16 element at a time (a mask or an address Triton cannot prove
    aligned)."""
    widths = [int(v or 1) * int(b) for v, b in re.findall(op + r"\.global(?:\.\w+)*?(?:\.v(\d))?\.b(\d+)", ptx)]
    return max(widths, default=0)


_DOT = re.compile(r"= (?:ttng\.warp_group_dot|tt\.dot) .*?: \S*?<(\d+)x(\d+)x\w+.*?-> tensor<(\d+)x(\d+)x")


def mma_usage(ttgir: str, ptx: str, num_warps: int) -> dict:
    """The tensor-core instructions a kernel issues against what its tiles need.

    kind: "wgmma" (Hopper warpgroup MMA), "mma.sync" (Ampere-style, per warp; what sm_120 has) or
    "none" (dots lowered to FMAs, as fp32 "ieee" dots are). count: MMA instructions in the PTX, the
    code every warp (group) runs; minimum: how many it would take if the warps split every product
    (the TTGIR's dots, M x N x K each) among themselves with the instruction shapes chosen, so
    count > minimum means some warps compute a product another warp also computes (a tile with
    fewer rows than the warps' layout covers: 8 warps as [8, 1] on 64 rows run every MMA twice).
    The PTX and the final TTGIR hold the same, already pipelined and peeled, loop bodies."""
    needed = sum(int(m) * int(k) * int(n) for m, k, _, n in _DOT.findall(ttgir))
    wg = [(int(n), int(k)) for n, k in re.findall(r"wgmma\.mma_async\S*?\.m64n(\d+)k(\d+)", ptx)]
    ms = [(int(m), int(n), int(k)) for m, n, k in re.findall(r"\bmma\.sync\S*?\.m(\d+)n(\d+)k(\d+)", ptx)]
    kinds = [name for name, found in (("wgmma", wg), ("mma.sync", ms)) if found]
    if not kinds:
        return {"mma": "none", "mma_count": 0, "mma_min": 0, "mma_dup": 1.0}
    # A dot Hopper cannot run as wgmma (fewer than 64 rows per warpgroup) falls back to mma.sync
    # beside the others: the kind reads "wgmma+mma.sync" then.
    issued = sum(64 * n * k for n, k in wg) * max(1, num_warps // 4) + sum(m * n * k for m, n, k in ms) * num_warps
    count = len(wg) + len(ms)
    return {
        "mma": "+".join(kinds),
        "mma_count": count,
        "mma_min": round(count * needed / issued) if issued else 0,
        "mma_dup": round(issued / needed, 3) if needed else 1.0,
    }


def pipeline_depth(ttgir: str) -> int:
    """Buffers of the deepest multi-buffered shared-memory tile the software pipeliner allocated
    (the loop's stages of loads in flight); 0 when no loop was pipelined."""
    return max(
        (int(d) for d in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)),
        default=0,
    )


def tma_loads(ptx: str) -> int:
    """Tensor-memory-accelerator bulk copies (TMA tensor descriptors) in the PTX."""
    return len(re.findall(r"cp\.async\.bulk\.tensor", ptx))


def compile_one(case: dict, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"kernels.{case['module']}"), case["kernel"])
    row = {
        "kernel": case["kernel"],
        "config": case["label"],
        "num_warps": case["num_warps"],
        "num_stages": case["num_stages"],
        "arch": arch,
        "dtype": case["dtype"],
    }
    t0 = time.perf_counter()
    try:
        sig = _signature(fn, case)
        plain = case.get("plain_ints", set())
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, p in enumerate(fn.params)
            if p.name not in plain
            and (sig[p.name].startswith("*") or p.name.startswith("stride") or p.name in DIVISIBLE_INTS)
        }
        src = ASTSource(fn=fn, signature=sig, constexprs=case["constexprs"], attrs=attrs)
        k = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]},
        )
        row.update(ok=True, shared=int(k.metadata.shared), fits=int(k.metadata.shared) <= SHARED_LIMIT[arch])
        usage = resource_usage(k.asm["cubin"])
        if usage is not None:
            row.update(registers=usage[0], spill_bytes=usage[1])
        row.update(
            load_bits=widest_global_access(k.asm["ptx"], "ld"),
            store_bits=widest_global_access(k.asm["ptx"], "st"),
            async_copies=len(re.findall(r"async_copy_global_to_local", k.asm["ttgir"])),
            pipeline_depth=pipeline_depth(k.asm["ttgir"]),
            tma=tma_loads(k.asm["ptx"]),
            # wgmma results waited for at once (nothing left in flight): no MMA/softmax overlap there
            full_waits=len(re.findall(r"warp_group_dot_wait .*\{pendings = 0", k.asm["ttgir"])),
            **mma_usage(k.asm["ttgir"], k.asm["ptx"], case["num_warps"]),
        )
    except Exception as e:  # a lowering or ptxas failure is the finding
        row.update(ok=False, fits=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _run(args):
    return compile_one(*args)


def compile_all(archs=(90, 120), workers: int | None = None, only: str | None = None) -> list[dict]:
    from kernels._utils import interpreting

    if interpreting():
        raise RuntimeError("run the compile check without TRITON_INTERPRET (it compiles for real GPUs)")
    jobs = [(c, a) for a in archs for c in _cases(only) if a in c.get("archs", archs)]
    with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(_run, jobs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__)
    p.add_argument(
        "--arch", type=int, action="append", choices=sorted(SHARED_LIMIT), help="target (repeatable; default both)"
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--kernel", default=None, help="only kernels whose name contains this (e.g. attn_bwd)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all(tuple(args.arch or sorted(SHARED_LIMIT)), args.workers, args.kernel)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            status = "ok" if r["ok"] and r["fits"] else ("TOO MUCH SHARED MEMORY" if r["ok"] else "FAILED")
            shared = f"{r['shared'] / 1024:6.1f} KB" if r.get("shared") is not None else "       -"
            regs = f"{r['registers']:4d} regs {r['spill_bytes']:5d} B spilled" if "registers" in r else ""
            if "load_bits" in r:
                regs += f" {r['load_bits']:3d}/{r['store_bits']:3d}-bit ld/st {r['async_copies']:2d} async"
                regs += f" depth {r['pipeline_depth']} tma {r['tma']:2d} waits0 {r['full_waits']:2d}"
                if r["mma"] != "none":
                    regs += f" {r['mma']} {r['mma_count']:3d} (min {r['mma_min']:3d})"
            print(
                f"{ARCH_NAME[r['arch']]:<20} {r['kernel']:<30} {r['config']:<48} w{r['num_warps']} "
                f"s{r['num_stages']} {shared} {regs}  {status} {r.get('error', '')}"
            )
    bad = [r for r in rows if not (r["ok"] and r["fits"])]
    print(f"{len(rows) - len(bad)} of {len(rows)} kernel configurations compile and fit", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
