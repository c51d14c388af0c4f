"""Every Triton kernel compiles, in the configurations we launch and autotune over, for Hopper
(sm_90) and the RTX 5090 (sm_120), and fits each one's shared memory: checked here without a GPU
(Triton ships ptxas), which the interpreter tests cannot do; and what the compiled attention code
runs (MMA kind and count, pipeline depth, spills) held to what the configs were chosen for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_ptxas() -> bool:
    try:
        import triton

        return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()
    except ImportError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="triton's bundled ptxas not found")
def test_every_kernel_compiles_and_fits_hopper_and_rtx5090():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "kernels.compile_check", "--json", "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    rows = json.loads(r.stdout)
    bad = [
        f"{x['arch']} {x['kernel']} {x['config']}: {x.get('error') or str(x.get('shared')) + ' bytes'}"
        for x in rows
        if not (x["ok"] and x["fits"])
    ]
    assert not bad, "\n".join(bad)
    assert {x["arch"] for x in rows} == {90, 120}
    kernels = {x["kernel"] for x in rows}
    assert {
        "_attn_fwd_kernel",
        "_attn_bwd_dkdv_kernel",
        "_rmsnorm_bwd_kernel",
        "_rope_kernel",
        "_ce_fwd_kernel",
        "_adamw_kernel",
    } <= kernels
    assert r.returncode == 0
    # Register spills (stack bytes read from the cubins with Triton's cuobjdump): every bf16 attention
    # config an autotuner tunes over, on either target, keeps its tiles in registers up to 64 bytes
    # a thread (triton spills a few registers outside the hot loop in some). The fp32 "ieee" path
    # runs its dots on FMAs and is exempt.
    dots = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")
    attention = [x for x in rows if x["kernel"] in dots and x["dtype"] == "bf16"]
    assert {x["arch"] for x in attention} == {90, 120}
    if "spill_bytes" in attention[0]:
        spilled = [
            f"{x['arch']} {x['kernel']} {x['config']} w{x['num_warps']} s{x['num_stages']}: {x['spill_bytes']} B"
            for x in attention
            if x["spill_bytes"] > 64
        ]
        assert not spilled, "attention configs spilling registers:\n" + "\n".join(spilled)
        assert all(0 < x["registers"] <= 255 for x in attention)
    # Hopper: warpgroup MMA in every config, and no product computed twice (every warpgroup owns
    # distinct rows: MMA instructions issued == the minimum the tile needs). 8 warps as [8, 1] on a
    # 64-row dK/dV tile, or a 64x32 tile at 8 warps falling back to mma.sync, fail here.
    hopper = [x for x in attention if x["arch"] == 90]
    wrong = [
        f"{x['kernel']} {x['config']} w{x['num_warps']} s{x['num_stages']}: {x['mma']} {x['mma_count']} "
        f"(min {x['mma_min']})"
        for x in hopper
        if x["mma"] != "wgmma" or x["mma_count"] != x["mma_min"] or x["mma_dup"] != 1.0
    ]
    assert not wrong, "sm_90 attention configs without wgmma or with duplicated products:\n" + "\n".join(wrong)
    # Pipelining reported as the compiled code has it: 3+ stages where a Hopper config asks for them.
    assert all(x["pipeline_depth"] >= min(x["num_stages"], 3) for x in hopper), [
        (x["config"], x["num_stages"], x["pipeline_depth"]) for x in hopper
    ]
    assert any(x["num_stages"] >= 3 for x in hopper if x["kernel"] != "_attn_fwd_kernel")
    assert all(x["mma"] == "mma.sync" for x in attention if x["arch"] == 120)
    assert all("tma" in x for x in attention)
    # Loads: 16-byte vectors everywhere (bf16 tiles read element by element would cap bandwidth),
    # and every attention loop software-pipelined (cp.async). A head dim passed as a runtime value
    # once kept its mask from folding away, which silently did neither.
    narrow = [
        f"{x['arch']} {x['kernel']} {x['config']}: {x['load_bits']}-bit"
        for x in rows
        if x["dtype"] == "bf16" and x.get("load_bits", 128) < 64
    ]
    assert not narrow, "narrow global loads:\n" + "\n".join(narrow)
    fp32_out = {"_attn_bwd_preprocess_kernel"}  # writes only rowsum(dO * O) in fp32
    narrow = [
        f"{x['arch']} {x['kernel']} {x['config']}: {x['store_bits']}-bit"
        for x in rows
        if x["dtype"] == "bf16" and x["kernel"] not in fp32_out and x.get("store_bits", 128) < 64
    ]
    assert not narrow, "narrow global stores:\n" + "\n".join(narrow)
    # The cross-entropy kernel's widest load would be its int64 target even if the logits were read
    # element by element, so its rows are held to 16-byte loads and stores of the logits and the
    # gradient, rows off 16-byte boundaries (GPT-2's vocabulary) included.
    ce = [x for x in rows if x["kernel"] == "_ce_fwd_kernel"]
    assert any("odd V" in x["config"] for x in ce)
    assert all(x["load_bits"] == 128 and x["store_bits"] == 128 for x in ce), [
        (x["config"], x["load_bits"], x["store_bits"]) for x in ce
    ]
    loops = [x for x in rows if x["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")]
    assert loops and all(x["async_copies"] > 0 for x in loops), [x["config"] for x in loops if not x["async_copies"]]


def test_mma_usage_counts_duplicated_products():
    # Parsing alone (no compile): a 64x64x128 dot whose PTX issues 8 m64n32k16 per warpgroup at 8
    # warps (two warpgroups) does the work twice; at 4 warps it is the minimum.
    from kernels.compile_check import mma_usage, pipeline_depth, tma_loads

    ttgir = (
        "%s = ttng.warp_group_dot %a, %b, %c {isAsync = true} : !ttg.memdesc<64x128xbf16, #shared> * "
        "!ttg.memdesc<128x64xbf16, #shared1> -> tensor<64x64xf32, #mma>\n"
        "%buf = ttg.local_alloc : () -> !ttg.memdesc<3x64x128xbf16, #shared, #smem, mutable>\n"
    )
    ptx = "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {...};\n" * 16
    assert mma_usage(ttgir, ptx, 8) == {"mma": "wgmma", "mma_count": 16, "mma_min": 8, "mma_dup": 2.0}
    assert mma_usage(ttgir, ptx, 4) == {"mma": "wgmma", "mma_count": 16, "mma_min": 16, "mma_dup": 1.0}
    sync = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};\n" * 128
    assert mma_usage(ttgir.replace("ttng.warp_group_dot", "tt.dot"), sync, 2)["mma_dup"] == 1.0
    assert pipeline_depth(ttgir) == 3 and tma_loads(ptx) == 0


def test_compile_cases_declare_every_pointer_dtype():
    # Each kernel module declares its compile-check cases; the signature comes from the declared
    # pointer types, and an undeclared pointer is an error rather than a dtype guessed from its name.
    import importlib

    from kernels.compile_check import _cases, _signature

    cases = _cases()
    assert {c["module"] for c in cases} == {"rms_norm", "rope", "swiglu", "attention", "cross_entropy", "adamw"}
    for c in cases:
        fn = getattr(importlib.import_module(f"kernels.{c['module']}"), c["kernel"])
        sig = _signature(fn, c)
        assert {n for n, t in sig.items() if t.startswith("*")} == set(c["pointers"]), c["kernel"]
    ce = next(c for c in cases if c["kernel"] == "_ce_fwd_kernel")
    assert _signature(importlib.import_module("kernels.cross_entropy")._ce_fwd_kernel, ce)["targets_ptr"] == "*i64"
    fn = importlib.import_module("kernels.cross_entropy")._ce_fwd_kernel
    with pytest.raises(ValueError, match="targets_ptr has no declared dtype"):
        _signature(fn, {**ce, "pointers": {k: v for k, v in ce["pointers"].items() if k != "targets_ptr"}})
