"""Every figure's convention against a hand computation: model vs hardware FLOPs, MFU against the
peak of the step's dtype, the activation-memory estimate (lse term included) against what autograd
saves, step breakdowns that sum to their total, and report rows that name their results file."""

import contextlib
import inspect
import json
import subprocess
import time

import pytest
import torch

from bench.e2e import hardware_tflops_by_component, profile_breakdown, step_figures
from bench.flops import main as flops_main
from bench.report import build_report
from bench.results import LOCAL_RESULTS_DIR, RESULTS_DIR, ResultsWriter, default_results_dir
from model import ModelConfig, TransformerLM
from model.flops import (
    forward_flops_breakdown,
    saved_activation_bytes,
    training_flops_per_token,
    training_hardware_flops_breakdown,
    training_memory,
)
from train.config import preset
from train.devices import lookup_peak

# One layer, d = 8 (2 heads of 4), T = 4, d_ff = 16, V = 10: small enough to count by hand.
TINY = ModelConfig(vocab_size=10, context_length=4, d_model=8, num_layers=1, num_heads=2, d_ff=16)


def test_model_flops_of_a_tiny_config_by_hand():
    # attention projections: q, k, v, o, each 2 * T * d * d; attention: QK^T and AV, 2 * T * T * d each
    # (dense, causal or not); SwiGLU: w1, w3, w2, 2 * T * d * d_ff each; head: 2 * T * d * V
    by_hand = {"attn_proj": 4 * 2 * 4 * 8 * 8, "attn_matmul": 2 * 2 * 4 * 4 * 8, "ffn": 3 * 2 * 4 * 8 * 16}
    by_hand["lm_head"] = 2 * 4 * 8 * 10
    assert by_hand == {"attn_proj": 2048, "attn_matmul": 512, "ffn": 3072, "lm_head": 640}
    assert forward_flops_breakdown(TINY, 4, 1) == by_hand
    assert training_flops_per_token(TINY) == 3 * 6272 / 4 == 4704  # 3x forward, per token


def test_hardware_flops_of_a_tiny_config_by_hand():
    matmuls = 3 * (2048 + 3072 + 640)  # executed as counted
    # triton: causal half of the scores; forward 2 matmuls, backward 4 (dK/dV) + 3 (dQ) of the same size
    triton_attn = 512 / 2 * (2 + 4 + 3) / 2
    assert triton_attn == 1152
    assert sum(training_hardware_flops_breakdown(TINY, 4, 1, "triton").values()) == matmuls + 1152
    # torch reference: the full T x T scores, backward 2 matmuls per forward matmul
    assert sum(training_hardware_flops_breakdown(TINY, 4, 1, "torch").values()) == matmuls + 3 * 512
    with pytest.raises(ValueError, match="unknown kernel backend"):
        training_hardware_flops_breakdown(TINY, 4, 1, "cuda")


def test_hardware_count_follows_the_attention_kernels_matmuls():
    # The 2 + 4 + 3 above are the tl.dot calls of the flash-attention kernels: a kernel that
    # gains or loses one (a recompute added or removed) must change model.flops with it.
    from kernels import attention

    def dots(jit_fn):
        # The default (deterministic) path: the dK/dV block's ATOMIC_DQ branch, which only the
        # deterministic=False backward compiles in, is not part of it.
        return inspect.getsource(jit_fn.fn).split("if ATOMIC_DQ:")[0].count("tl.dot(")

    assert (dots(attention._fwd_inner), dots(attention._dkdv_block), dots(attention._dq_block)) == (2, 4, 3)


def test_mfu_counts_model_flops_against_the_peak_of_the_step_dtype():
    cfg, _ = preset("tinystories")
    h100 = lookup_peak("NVIDIA H100 80GB HBM3")
    tok_s = 64 * 256 / 0.010  # 64 x 256 tokens in 10 ms
    model = tok_s * 3 * (137438953472 + 34359738368 + 270582939648 + 167772160000) / (64 * 256)
    bf16 = step_figures(cfg, 64, "triton", "bf16", 10.0, h100, measured_peak_flops=800e12)
    assert bf16["tokens_per_s"] == pytest.approx(tok_s)
    assert bf16["model_tflops"] == pytest.approx(model / 1e12)
    assert bf16["mfu"] == pytest.approx(model / 989.4e12)
    assert bf16["mfu_measured_peak"] == pytest.approx(model / 800e12)
    assert "bf16 989.4" in bf16["mfu_peak"]
    fp32 = step_figures(cfg, 64, "torch", "fp32", 10.0, h100, measured_peak_flops=800e12)
    assert fp32["mfu"] == pytest.approx(model / 67e12)  # the fp32 peak, not bf16's
    assert fp32["mfu_measured_peak"] is None  # the measured peak is a bf16 matmul
    assert step_figures(cfg, 64, "torch", "fp32", 10.0, lookup_peak("NVIDIA B200"))["mfu"] is None  # no fp32 figure
    # hardware TFLOP/s: what the backend executes, here less than the model count (causal half)
    hw = sum(training_hardware_flops_breakdown(cfg, 256, 64, "triton").values())
    assert bf16["hardware_tflops"] == pytest.approx(hw / 0.010 / 1e12) and hw < model * 0.010


def test_component_tflops_are_hardware_flops_over_component_time():
    hw = training_hardware_flops_breakdown(TINY, 4, 2, "triton")
    got = hardware_tflops_by_component(TINY, 2, "triton", {"matmul": 2.0, "attention": 0.5})
    assert got["matmul"] == pytest.approx((hw["attn_proj"] + hw["ffn"] + hw["lm_head"]) / 2e-3 / 1e12)
    assert got["attention"] == pytest.approx(2 * 1152 / 0.5e-3 / 1e12)
    # torch: attention's batched matmuls run as matmuls, so they are counted there
    got = hardware_tflops_by_component(TINY, 2, "torch", {"matmul": 2.0, "attention": 0.0})
    assert got["matmul"] == pytest.approx(2 * (17280 + 1536) / 2e-3 / 1e12) and got["attention"] is None


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_estimate_matches_what_autograd_saves(kernels, dtype):
    # Distinct sizes (N = 60, d = 48, D = 12, d_ff = 80, V = 101) so that no term can stand in for another.
    cfg = ModelConfig(vocab_size=101, context_length=20, d_model=48, num_layers=2, num_heads=4, d_ff=80)
    model = TransformerLM(cfg, kernels=kernels)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            held[s.data_ptr()] = s.nbytes()  # each storage once: views share it
        return t

    x = torch.randint(0, 101, (3, 20))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = model(x, targets=x)
    if kernels == "triton":  # the fused loss keeps dx and dweight as attributes, not saved tensors
        for t in (loss.grad_fn.dx, loss.grad_fn.dw):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert sum(saved_activation_bytes(cfg, 3, 20, kernels, dtype, "cpu").values()) == sum(held.values())


def test_memory_estimate_counts_the_lse_per_head():
    cfg, _ = preset("tinystories")  # 4 layers, 16 heads, batch 64 x 256 tokens
    terms = training_memory(cfg, 64, 256, kernels="triton", dtype="bf16").activation_terms
    assert terms["attention log-sum-exp (fp32, per head)"] == 4 * 16 * 4 * 64 * 256 == 4 * 2**20
    est = training_memory(cfg, 64, 256, kernels="triton", dtype="bf16")
    assert est.params == est.grads == 4 * 22_696_448 and est.optimizer == 8 * 22_696_448
    assert est.total == est.params + est.grads + est.optimizer + sum(terms.values())
    with pytest.raises(ValueError, match="pre-norm"):
        saved_activation_bytes(ModelConfig(ffn="silu", d_ff=2048), 1)


def test_step_breakdown_parts_sum_to_its_total_and_name_the_rest():
    a = torch.randn(64, 64)

    def step():
        a @ a
        time.sleep(0.02)  # host time in no op: unattributed

    t0 = time.perf_counter()
    parts = profile_breakdown(step, torch.device("cpu"), steps=2)
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    assert set(parts) == {"matmul", "attention", "norm", "rope", "swiglu", "loss", "optimizer"} | {
        "unclassified",
        "unattributed",
    }
    assert parts["matmul"] > 0 and parts["unattributed"] >= 20.0
    # the total is the profiled steps' wall time: at least the sleep, at most the whole call over 2 steps
    assert 20.0 <= sum(parts.values()) <= elapsed_ms / 2


def test_report_rows_name_their_results_files(tmp_path):
    for name, ms in (("a", 41.0), ("b", 1067.0)):
        w = ResultsWriter("cpu", tmp_path / name)
        w.meta["date"] = f"2026-01-0{1 + (name == 'b')}T00:00:00+00:00"
        w.add(kind="e2e", preset="smoke", backend="torch", dtype="fp32", batch_size=16, ms=ms, tokens_per_s=1e3)
        w.add(kind="kernel", op="rms_norm", shape="s", mode="fwd", backend="torch", ms=ms / 100)
        w.add(kind="e2e", preset="smoke", backend="torch", ms=ms, breakdown_ms={"matmul": 1.0, "unattributed": 2.0})
        w.rows[-1]["breakdown_total_ms"] = 3.0
        w.write()
    text = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "rep").read_text()
    files = {n: next((tmp_path / n).glob("*.json")).name for n in ("a", "b")}
    for n, ms in (("a", "41.00"), ("b", "1,067.00")):
        e2e = [x for x in text.splitlines() if x.startswith("| smoke | torch | fp32 |") and f"| {ms} |" in x]
        assert len(e2e) == 1 and files[n] in e2e[0]
        kern = [x for x in text.splitlines() if x.startswith("| rms_norm |") and files[n] in x]
        assert len(kern) == 1
    breakdown = [x for x in text.splitlines() if x.startswith("| smoke | torch | 1.00 |")]
    assert len(breakdown) == 2 and all("| 2.00 | 3.00 |" in x for x in breakdown)
    assert "model FLOPs" in text and "hardware FLOPs" in text


def test_local_results_go_where_git_ignores_them(monkeypatch):
    monkeypatch.delenv("BENCH_RESULTS_DIR", raising=False)
    monkeypatch.delenv("BENCH_RECORD", raising=False)
    assert default_results_dir() == LOCAL_RESULTS_DIR
    probe = LOCAL_RESULTS_DIR / "x.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=RESULTS_DIR.parent.parent)
    assert ignored.returncode == 0, "bench/results/local/ must be git-ignored"
    assert default_results_dir(record=True) == RESULTS_DIR
    monkeypatch.setenv("BENCH_RECORD", "1")
    assert default_results_dir() == RESULTS_DIR
    monkeypatch.setenv("BENCH_RESULTS_DIR", "/somewhere")
    assert str(default_results_dir()) == "/somewhere"


def test_flops_cli_labels_model_and_hardware_flops(capsys):
    assert flops_main(["--preset", "tinystories", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "training model FLOPs (3x forward, no recompute; what MFU counts)" in out
    assert "training hardware FLOPs (executed)" in out and "attention log-sum-exp" in out
    assert flops_main(["--preset", "tinystories", "--batch-size", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    cfg, _ = preset("tinystories")
    assert r["training_flops"] == 3 * r["forward_flops"]
    assert r["training_hardware_flops"]["triton"] == r["training_flops"] - 0.75 * r["breakdown"]["attn_matmul"]
    assert r["memory_estimate_bytes"]["activations"] == sum(saved_activation_bytes(cfg, 64, 256).values())
