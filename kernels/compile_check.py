"""``python -m kernels.compile_check``: compile every Triton kernel, in the configurations the
launchers and autotuners use, for Hopper (sm_90) and the RTX 5090 (sm_120), on a machine without a
GPU (Triton ships ptxas), and check each one's shared memory against the device's per-block limit.
Registers and spilled bytes per thread are printed beside it.

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

FP32_PTRS = {"rstd_ptr", "dw_partial_ptr", "LSE", "DELTA", "loss_ptr", "n_valid_ptr", "inv_freq_ptr", "scale_ptr"}
I64_PTRS = {"pos_ptr", "targets_ptr", "offset_ptr", "numel_ptr"}
I32_PTRS = {"work_ptr"}
FLOAT_SCALARS = {"eps", "qk_scale", "sm_scale", "decay", "alpha", "beta1", "beta2"}
# Integer arguments compiled as multiples of 16, as Triton's JIT specializes them when they are (it
# does so for every pointer and int argument): strides and sizes are at the presets' shapes
# (widths 512..4096, d_ff F 1344 and 3072, T 256 and 1024, head dim 32..128), and the cross-entropy kernel's
# row width V is one at 10,000 and 32,000 and, padded by the fused head, at GPT-2's 50,257. Not
# ignore_index or head counts, which compile as plain ints.
DIVISIBLE_INTS = {"M", "N", "numel", "V", "T", "R", "HALF", "F"}
ATTENTION_PTRS = {"Q", "K", "V", "O", "LSE", "DO", "DELTA", "DK", "DV", "DQ"}


def _cases() -> list[dict]:
    """(kernel, constexprs, launch options, activation dtype) in the configurations used."""
    from kernels import adamw, attention, cross_entropy, rms_norm, rope, swiglu

    cases = []
    for n in (512, 4096, 16384):
        block_n, rows, warps = rms_norm._launch_params(n)
        launch = dict(module="rms_norm", num_warps=warps, num_stages=2, dtype="bf16")
        for res in (False, True) if n <= 4096 else (False,):  # the fused residual add, at model widths
            label = f"N={n}" + (" + residual" if res else "")
            cases.append(
                dict(
                    launch,
                    kernel="_rmsnorm_fwd_kernel",
                    constexprs={"ROWS": rows, "BLOCK_N": block_n, "HAS_RES": res},
                    label=label,
                )
            )
            cases.append(
                dict(
                    launch,
                    kernel="_rmsnorm_bwd_kernel",
                    constexprs={"ROWS": rows, "BLOCK_N": block_n, "HAS_DRES": res, "HAS_DR": res},
                    label=label,
                )
            )
    for d in (32, 128):
        block_r, block_h = rope._launch_params(d)
        for inverse in (False, True):
            cases.append(
                dict(
                    module="rope",
                    kernel="_rope_kernel",
                    constexprs={"HAS_K": True, "INVERSE": inverse, "BLOCK_R": block_r, "BLOCK_H": block_h},
                    num_warps=4,
                    num_stages=2,
                    dtype="bf16",
                    label=f"D={d} inverse={inverse}",
                )
            )
    for k in ("_swiglu_fwd_kernel", "_swiglu_bwd_kernel"):
        cases.append(
            dict(
                module="swiglu",
                kernel=k,
                constexprs={"BLOCK": swiglu.BLOCK},
                num_warps=4,
                num_stages=2,
                dtype="bf16",
                label="",
            )
        )
    block_r, block_f = swiglu._packed_blocks(1344)
    for k in ("_swiglu_packed_fwd_kernel", "_swiglu_packed_bwd_kernel"):
        cases.append(
            dict(
                module="swiglu",
                kernel=k,
                constexprs={"BLOCK_R": block_r, "BLOCK_F": block_f},
                num_warps=4,
                num_stages=2,
                dtype="bf16",
                label=f"BLOCK_R={block_r} BLOCK_F={block_f}",
            )
        )
    for d in (32, 64, 128):
        for cfg in attention._fwd_configs(d >= attention.LARGE_D):
            cases.append(
                dict(
                    module="attention",
                    kernel="_attn_fwd_kernel",
                    constexprs={"CAUSAL": True, "DOT_PRECISION": "tf32", "D": d, "BLOCK_D": d, **cfg.kwargs},
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    dtype="bf16",
                    label=f"D={d} {cfg.kwargs}",
                )
            )
    cases.append(
        dict(
            module="attention",
            kernel="_attn_fwd_kernel",
            constexprs={"CAUSAL": False, "DOT_PRECISION": "ieee", "D": 64, "BLOCK_D": 64, "BLOCK_M": 64, "BLOCK_N": 64},
            num_warps=4,
            num_stages=3,
            dtype="fp32",
            label="fp32 ieee D=64",
        )
    )
    for d in (32, 64, 128):
        cases.append(
            dict(
                module="attention",
                kernel="_attn_bwd_preprocess_kernel",
                constexprs={"BLOCK_M": 64, "D": d, "BLOCK_D": d},
                num_warps=4,
                num_stages=2,
                dtype="bf16",
                label=f"D={d}",
            )
        )
    for d in (32, 64, 128):
        for k, which in (("_attn_bwd_dkdv_kernel", "dkdv"), ("_attn_bwd_dq_kernel", "dq")):
            for cfg in attention._bwd_configs(d >= attention.LARGE_D, which):
                cases.append(
                    dict(
                        module="attention",
                        kernel=k,
                        constexprs={"CAUSAL": True, "DOT_PRECISION": "tf32", "D": d, "BLOCK_D": d, **cfg.kwargs},
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        dtype="bf16",
                        label=f"D={d} {cfg.kwargs}",
                    )
                )
    for single, block in ((True, 16384), (True, 32768), (False, 4096)):
        for dtype in ("bf16", "fp32") if single else ("bf16",):
            cases.append(
                dict(
                    module="cross_entropy",
                    kernel="_ce_fwd_kernel",
                    constexprs={"BLOCK_V": block, "SINGLE_PASS": single, "ALIGN": 1},
                    num_warps=cross_entropy._warps(block),
                    num_stages=2,
                    dtype=dtype,
                    label=f"single_pass={single} BLOCK_V={block}",
                )
            )
    # Rows whose starts are off 16-byte boundaries (GPT-2's V = 50,257 in bf16: two sweeps; an odd
    # width in fp32 in one): the width and strides compile as plain ints, as the JIT sees them.
    for single, block, dtype, align in ((False, 4096, "bf16", 8), (True, 16384, "bf16", 8), (True, 8192, "fp32", 4)):
        cases.append(
            dict(
                module="cross_entropy",
                kernel="_ce_fwd_kernel",
                constexprs={"BLOCK_V": block, "SINGLE_PASS": single, "ALIGN": align},
                num_warps=cross_entropy._warps(block),
                num_stages=2,
                dtype=dtype,
                plain_ints={"V", "stride_logits", "stride_grad"},
                label=f"single_pass={single} BLOCK_V={block} odd V, ALIGN={align}",
            )
        )
    for p_ty, g_ty in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16")):
        cases.append(
            dict(
                module="adamw",
                kernel="_adamw_kernel",
                constexprs={
                    "ALIGN_P": 16 // _BYTES[p_ty],
                    "ALIGN_G": 16 // _BYTES[g_ty],
                    "ALIGN_M": 4,
                    "ALIGN_V": 4,
                    "HAS_SCALE": True,
                    "BLOCK": adamw.BLOCK,
                },
                num_warps=4,
                num_stages=2,
                dtype=p_ty,
                ptr_dtypes={"p_base": p_ty, "g_base": g_ty, "m_base": "fp32", "v_base": "fp32"},
                label=f"params {p_ty}, grads {g_ty}",
            )
        )
    cases.append(
        dict(
            module="cross_entropy",
            kernel="_scale_unless_one_kernel",
            constexprs={"BLOCK": 4096},
            num_warps=8,
            num_stages=2,
            dtype="bf16",
            label="",
        )
    )
    return cases


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _signature(fn, dtype: str, module: str) -> dict:
    sig = {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n.endswith("_ptr") or (module == "attention" and n in ATTENTION_PTRS):
            sig[n] = (
                "*fp32" if n in FP32_PTRS else ("*i64" if n in I64_PTRS else "*i32" if n in I32_PTRS else f"*{dtype}")
            )
        elif n in FLOAT_SCALARS:
            sig[n] = "fp32"
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
        sig = _signature(fn, case["dtype"], case["module"])
        sig.update({k: f"*{v}" for k, v in case.get("ptr_dtypes", {}).items()})
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
        )
    except Exception as e:  # a lowering or ptxas failure is the finding
        row.update(ok=False, fits=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _run(args):
    return compile_one(*args)


def compile_all(archs=(90, 120), workers: int | None = None) -> list[dict]:
    from kernels._utils import interpreting

    if interpreting():
        raise RuntimeError("run the compile check without TRITON_INTERPRET (it compiles for real GPUs)")
    jobs = [(c, a) for a in archs for c in _cases()]
    with ProcessPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(_run, jobs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.compile_check", description=__doc__)
    p.add_argument(
        "--arch", type=int, action="append", choices=sorted(SHARED_LIMIT), help="target (repeatable; default both)"
    )
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = compile_all(tuple(args.arch or sorted(SHARED_LIMIT)), args.workers)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            status = "ok" if r["ok"] and r["fits"] else ("TOO MUCH SHARED MEMORY" if r["ok"] else "FAILED")
            shared = f"{r['shared'] / 1024:6.1f} KB" if r.get("shared") is not None else "       -"
            regs = f"{r['registers']:4d} regs {r['spill_bytes']:5d} B spilled" if "registers" in r else ""
            regs += (
                f" {r['load_bits']:3d}/{r['store_bits']:3d}-bit ld/st {r['async_copies']:2d} async"
                if "load_bits" in r
                else ""
            )
            print(
                f"{ARCH_NAME[r['arch']]:<20} {r['kernel']:<30} {r['config']:<48} w{r['num_warps']} "
                f"s{r['num_stages']} {shared} {regs}  {status} {r.get('error', '')}"
            )
    bad = [r for r in rows if not (r["ok"] and r["fits"])]
    print(f"{len(rows) - len(bad)} of {len(rows)} kernel configurations compile and fit", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
