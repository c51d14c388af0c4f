"""The benchmark harness's own logic, on the CPU: FLOPs accounting against FlopCounterMode, the
FLOPs CLI, kernel cases, result provenance and the report."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.flops import flops_report
from bench.flops import main as flops_main
from bench.kernel_cases import build_cases, run_case
from bench.peaks import lookup_peak
from bench.report import build_report
from bench.results import ResultsWriter, load_results
from model import ModelConfig, TransformerLM
from model.flops import count_parameters, forward_flops_breakdown


@pytest.mark.parametrize("ffn,d_ff", [("swiglu", 80), ("silu", 128)])
def test_analytic_flops_match_flop_counter(ffn, d_ff):
    cfg = ModelConfig(vocab_size=97, context_length=24, d_model=32, num_layers=2, num_heads=4, d_ff=d_ff, ffn=ffn)
    model = TransformerLM(cfg)
    x = torch.randint(0, 97, (3, 24))
    with FlopCounterMode(display=False) as fc:
        model(x)
    assert fc.get_total_flops() == sum(forward_flops_breakdown(cfg, 24, 3).values())
    assert count_parameters(cfg)["total"] == model.num_parameters()


def test_analytic_training_flops_match_flop_counter_on_both_backends():
    cfg = ModelConfig(vocab_size=97, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=48)
    x = torch.randint(0, 97, (2, 16))
    expect = 3 * sum(forward_flops_breakdown(cfg, 16, 2).values())
    for kernels in ("torch", "triton"):
        model = TransformerLM(cfg, kernels=kernels)
        with FlopCounterMode(display=False) as fc:
            model(x, targets=x).backward()
        assert fc.get_total_flops() == expect, kernels


def test_flops_cli_json_matches_the_writeup(capsys):
    assert flops_main(["--preset", "gpt2-xl", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 2_127_057_600
    assert out["forward_flops"] == pytest.approx(4.513e12, rel=1e-3)
    assert set(out["breakdown"]) == {"attn_proj", "attn_matmul", "ffn", "lm_head"}
    assert out["forward_flops"] == sum(out["breakdown"].values())
    assert out["breakdown_pct"]["ffn"] == pytest.approx(66.91, abs=0.01)
    long = flops_report("gpt2-xl", seq_len=16384)
    assert long["forward_flops"] / out["forward_flops"] == pytest.approx(33.13, abs=0.01)
    assert flops_main(["--preset", "tinystories", "--batch-size", "0"]) == 2


def test_memory_estimate_is_in_the_right_range():
    r = flops_report("gpt2-xl", batch_size=1, fused=False)
    gib = r["memory_estimate_bytes"]["params"] / 2**30
    assert gib == pytest.approx(7.92, abs=0.01)


def test_peak_table_lookup():
    assert lookup_peak("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert lookup_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert lookup_peak("NVIDIA H200").bandwidth_gbs == 4800.0
    assert lookup_peak("NVIDIA GeForce RTX 5090").bf16_tflops == 209.5
    assert lookup_peak("NVIDIA A100-SXM4-80GB").name == "A100 SXM 80GB"
    assert lookup_peak("NVIDIA B200") and lookup_peak("NVIDIA L40S")
    assert lookup_peak("NVIDIA GH200 480GB").name == "GH200"  # not the H200 entry its name contains
    assert lookup_peak("NVIDIA H200").name == "H200"
    assert lookup_peak("Some Unknown GPU") is None


def test_kernel_cases_run_on_cpu_and_results_make_a_report(tmp_path):
    cases = build_cases(torch.device("cpu"), quick=True)
    assert {c.op for c in cases} == {
        "rms_norm",
        "add_rms_norm",
        "swiglu",
        "swiglu_packed",
        "rope_qk",
        "attention",
        "cross_entropy",
        "adamw",
    }
    writer = ResultsWriter("cpu", tmp_path)
    for case in cases:
        assert "ours" in case.backends  # through the interpreter here
        for backend in ("torch", "ours"):
            for mode in case.modes:
                row, call = run_case(
                    case, backend, mode, torch.device("cpu"), torch.float32, 10.0, 1e12, warmup=1, rep=3
                )
                assert "error" not in row, row
                assert row["ms"] > 0 and (row.get("gb_s") or row.get("tflops")) > 0
                writer.add(**row)
    path = writer.write()
    rows = load_results([tmp_path])
    assert len(rows) == len(writer.rows) and all(r["device"] and r["torch"] and r["git_commit"] for r in rows)
    assert path.name.endswith(".json")
    report = build_report([tmp_path], tmp_path / "rep")
    text = report.read_text()
    assert "| rms_norm |" in text and "Provenance" in text and (tmp_path / "rep" / "flops.png").exists()


def test_report_shows_gpu_busy_and_autotuned_tiles(tmp_path):
    # Rows shaped like the GPU check's (written by hand: no GPU here).
    writer = ResultsWriter("cpu", tmp_path)
    writer.add(
        kind="kernel",
        op="attention",
        shape="long B4 H16 T4096 D128 causal",
        backend="ours",
        mode="fwd+bwd",
        dtype="bfloat16",
        ms=3.0,
        tflops=320.0,
        autotuned={"fwd": "128x64 w8 s3", "bwd_dq": "64x32 w8 s2"},
    )
    writer.add(
        kind="e2e",
        preset="tinystories",
        backend="triton",
        batch_size=64,
        ms=8.0,
        tokens_per_s=2.0e6,
        mfu=0.23,
        breakdown_ms={"matmul": 4.0, "unclassified": 1.2, "unattributed": 2.8},
        breakdown_total_ms=8.0,
        device_busy_pct=65.0,
    )
    writer.add(kind="e2e", preset="tinystories", backend="torch", batch_size=64, ms=20.0, tokens_per_s=8.0e5)
    text = build_report([tmp_path], tmp_path / "rep").read_text()
    assert "fwd 128x64 w8 s3, bwd_dq 64x32 w8 s2" in text
    line = next(x for x in text.splitlines() if x.startswith("| tinystories | triton |") and "%" in x)
    assert "| 65% |" in line and "| 23.0% |" in line
    assert any(x.startswith("| tinystories | torch |") and "| - |" in x for x in text.splitlines())


def test_report_compares_training_runs(tmp_path, capsys):
    # Two runs shaped like the GPU check's (torch and triton backends, same data and seed).
    import json

    from bench.report import main as report_main

    for name, losses, tps in (
        ("ts-torch", [5.0, 4.0, 3.50], [1e5, 4e5, 5e5]),
        ("ts-triton", [5.0, 4.02, 3.49], [2e5, 9e5, 1e6]),
    ):
        run = tmp_path / name
        run.mkdir()
        rows = [
            {"step": 50 * (i + 1), "train_loss": v, "tokens_per_s": t, "mfu": t / 1e7, "wall_time": float(i)}
            for i, (v, t) in enumerate(zip(losses, tps))
        ]
        rows[-1]["val_loss"] = losses[-1] + 0.1
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"status": "finished", "step": 150, "wall_time": 3.0}))
    writer = ResultsWriter("cpu", tmp_path / "res")
    writer.add(kind="e2e", preset="tinystories", backend="torch", batch_size=64, ms=20.0, tokens_per_s=8.0e5)
    writer.write()
    assert (
        report_main(
            [
                str(tmp_path / "res"),
                "--out",
                str(tmp_path / "rep"),
                "--runs",
                str(tmp_path / "ts-torch"),
                str(tmp_path / "ts-triton"),
                str(tmp_path / "nothing"),
            ]
        )
        == 0
    )
    assert "nothing" in capsys.readouterr().err  # a run without metrics is named and left out
    text = (tmp_path / "rep" / "REPORT.md").read_text()
    triton = next(x for x in text.splitlines() if x.startswith("| ts-triton |"))
    # medians over the log intervals (the first holds compilation); final losses
    assert "| 900000 |" in triton and "| 9.0% |" in triton and "| 3.4900 | 3.5900 |" in triton
    assert "ts-triton vs ts-torch: training loss differs by at most 0.0200 (step 100) over 3 logged steps" in text


def test_failing_backend_is_a_row_not_a_crash():
    case = build_cases(torch.device("cpu"), quick=True)[0]
    case.backends["broken"] = lambda *a: 1 / 0
    row, call = run_case(case, "broken", "fwd", torch.device("cpu"), torch.float32, None, None, warmup=1, rep=3)
    assert row["error"].startswith("ZeroDivisionError") and call is None


def test_warm_up_runs_its_shard_of_our_kernels():
    from bench.warm import warm

    lines = [warm(i, 2, None, torch.device("cpu"), quick=True) for i in (0, 1)]
    ops = [line.split(" [")[0] for shard in lines for line in shard]
    assert sorted(ops) == sorted(c.op for c in build_cases(torch.device("cpu"), quick=True))
    assert all(": ok (" in line for shard in lines for line in shard), lines
    assert len(lines[0]) == len(lines[1]) == 4  # 8 cases, round robin


def test_benchmark_sessions_can_share_one_results_file(tmp_path, monkeypatch):
    # The GPU check runs several pytest sessions and may bring back at most 8 files: with
    # BENCH_RESULTS_APPEND=1 each session continues the newest file of the same device and commit.
    first = ResultsWriter("cpu", tmp_path)
    first.meta["date"] = "2026-01-01T00:00:00+00:00"  # an earlier session: its own file name
    first.add(kind="kernel", op="a", ms=1.0)
    (tmp_path / "other.json").write_text(
        '{"meta": {"device": "NVIDIA H100", "git_commit": "x"}, "rows": [{"kind": "e2e"}]}'
    )
    monkeypatch.setenv("BENCH_RESULTS_APPEND", "1")
    second = ResultsWriter("cpu", tmp_path)
    second.add(kind="e2e", preset="smoke", ms=2.0)
    files = sorted(tmp_path.glob("*.json"))
    assert [f.name for f in files if f.name != "other.json"] == [first.path.name]
    rows = [r for r in load_results([first.path])]
    assert [r["kind"] for r in rows] == ["kernel", "e2e"]
    monkeypatch.delenv("BENCH_RESULTS_APPEND")
    assert ResultsWriter("cpu", tmp_path).rows == []  # without it, a new file per session


@pytest.mark.slow
def test_op_count_of_a_training_step():
    from bench.op_count import NO_WORK, count_step_ops, main, tiny_model

    cfg = tiny_model("smoke")
    torch_ops, triton_ops = count_step_ops(cfg, "torch"), count_step_ops(cfg, "triton")
    assert not (set(torch_ops) | set(triton_ops)) & NO_WORK
    # The triton step: fused norms with their residual adds, one AdamW launch, packed projections
    # (one forward matmul for q/k/v and one for w1/w3 a layer, the head inside the fused loss).
    assert triton_ops["fastlm::add_rms_norm_fwd"] == 2 * cfg.num_layers
    assert triton_ops["aten::mm"] == 3 * 4 * cfg.num_layers  # qkv, output, w1/w3, w2: forward + 2 backward each
    assert triton_ops["aten::add.Tensor"] <= 2  # gradient sums only (the embeddings feed ln1 and the stream)
    assert triton_ops["aten::copy_"] == 0  # the interpreter's own argument copies are not counted
    assert (
        triton_ops["aten::arange.start"] == torch_ops["aten::arange.start"] == 1
    )  # positions built once, not per layer
    assert (
        sum(n for k, n in triton_ops.items() if k.startswith("aten::_foreach")) == 1
    )  # clipping's norm (the factor is applied in AdamW)
    assert sum(triton_ops.values()) < sum(torch_ops.values()) / 2
    assert main(["--preset", "smoke", "--kernels", "torch", "--top", "3"]) == 0


def test_report_names_a_file_that_is_not_results(tmp_path, capsys):
    from bench.report import main as report_main

    for text in ("", "not json", "[1, 2]"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        assert report_main([str(bad), "--out", str(tmp_path / "rep")]) == 1, text
        err = capsys.readouterr().err
        assert f"{bad} is not a results file" in err and "Traceback" not in err, err
