"""``python -m train`` end to end on the CPU: data paths, resume, signals, divergence, DDP."""

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from train.cli import main as train_main
from train.cli import resolve
from train.data_prep import download, fetch_dataset

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--quiet", "--kernels", "torch", "--device", "cpu"]


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_smoke_from_text_end_to_end(tmp_path, shared_data):
    args = SMOKE + [
        "--train-text",
        str(shared_data / "corpus.en"),
        "--data-dir",
        str(tmp_path / "data"),
        "--out-dir",
        str(tmp_path / "runs"),
        "--run-name",
        "r",
        "--max-steps",
        "30",
        "--eval-interval",
        "10",
        "--log-interval",
        "10",
        "--sample-tokens",
        "8",
    ]
    assert train_main(args) == 0
    run = tmp_path / "runs" / "r"
    rows = metrics(run)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all("val_loss" in r and np.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] and env["device"].startswith("CPU")
    assert (run / "samples.txt").read_text().count("Once upon a time") == 2
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert len(list((run / "checkpoints").glob("*.pt"))) >= 1
    # The cache makes a second run skip BPE training and encoding.
    prepared = list((tmp_path / "data" / "prepared").iterdir())
    assert len(prepared) == 1 and (prepared[0] / "train.bin").exists()


def _run(tmp_path, token_file, name, *extra):
    args = SMOKE + [
        "--train-data",
        str(token_file),
        "--out-dir",
        str(tmp_path),
        "--run-name",
        name,
        "--lr-decay-iters",
        "12",
        "--log-interval",
        "1",
        "--eval-interval",
        "100",
        "--sample-tokens",
        "0",
        "--checkpoint-interval",
        "4",
        *extra,
    ]
    return train_main(args)


@pytest.fixture
def one_thread():
    # Bit-exact comparisons: with several intra-op threads, CPU reductions may split work
    # differently from call to call (1-ulp noise in a reported loss, not in the parameters).
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_resume_gives_the_same_losses(tmp_path, token_file, one_thread):
    assert _run(tmp_path, token_file, "full", "--max-steps", "12") == 0
    assert _run(tmp_path, token_file, "split", "--max-steps", "6") == 0
    assert _run(tmp_path, token_file, "split", "--max-steps", "12") == 0  # resumes from step 6
    full = [r["train_loss"] for r in metrics(tmp_path / "full")]
    split = [r["train_loss"] for r in metrics(tmp_path / "split")]
    assert split == full
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").glob("*.pt"))
    assert kept == ["step_00000008.pt", "step_00000012.pt"]  # keep_checkpoints=2


@pytest.mark.slow
def test_sigusr1_checkpoints_and_resume_completes(tmp_path, token_file):
    cmd = [
        sys.executable,
        "-m",
        "train",
        *SMOKE,
        "--train-data",
        str(token_file),
        "--out-dir",
        str(tmp_path),
        "--run-name",
        "sig",
        "--max-steps",
        "400",
        "--log-interval",
        "1",
        "--eval-interval",
        "1000",
        "--sample-tokens",
        "0",
        "--checkpoint-interval",
        "1000",
        "--lr-decay-iters",
        "400",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    mfile = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (mfile.exists() and len(mfile.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err.decode()
    ckpts = list((tmp_path / "sig" / "checkpoints").glob("*.pt"))
    assert len(ckpts) == 1
    stopped_at = int(ckpts[0].stem.split("_")[1])
    assert 3 <= stopped_at < 400
    assert json.loads((tmp_path / "sig" / "summary.json").read_text())["status"] == "interrupted by SIGUSR1"
    # Resume with a shorter total so the test stays quick; the steps continue where they stopped.
    done = subprocess.run(
        [*cmd[: cmd.index("--max-steps") + 1], str(stopped_at + 5), *cmd[cmd.index("--max-steps") + 2 :]],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    steps = [r["step"] for r in metrics(tmp_path / "sig")]
    assert steps == list(range(1, stopped_at + 6))


def test_non_finite_loss_stops_with_a_message(tmp_path, token_file, capsys):
    code = _run(
        tmp_path,
        token_file,
        "nan",
        "--max-steps",
        "40",
        "--lr",
        "1e30",
        "--min-lr",
        "1e29",
        "--grad-clip",
        "0",
        "--warmup-iters",
        "0",
    )
    assert code == 2
    assert "non-finite training loss" in capsys.readouterr().err


def test_triton_without_gpu_points_to_torch(tmp_path, token_file, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = train_main(
        [
            "--preset",
            "smoke",
            "--kernels",
            "triton",
            "--device",
            "cpu",
            "--quiet",
            "--train-data",
            str(token_file),
            "--out-dir",
            str(tmp_path),
        ]
    )
    assert code == 1
    assert "--kernels torch" in capsys.readouterr().err


@pytest.mark.slow
def test_triton_kernels_train_with_the_fused_optimizer(tmp_path, token_file, monkeypatch):
    # Through Triton's interpreter on the CPU: the model's kernels and the fused AdamW step.
    from kernels import adamw

    calls = []
    real = adamw.adamw_step_
    monkeypatch.setattr(adamw, "adamw_step_", lambda *a, **kw: (calls.append(kw["step"]), real(*a, **kw))[1])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code = train_main(
        [
            "--preset",
            "smoke",
            "--kernels",
            "triton",
            "--device",
            "cpu",
            "--quiet",
            "--train-data",
            str(token_file),
            "--out-dir",
            str(tmp_path),
            "--run-name",
            "tri",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--context-length",
            "32",
            "--eval-interval",
            "100",
            "--sample-tokens",
            "0",
            "--log-interval",
            "1",
        ]
    )
    assert code == 0
    assert calls == [1, 2]  # one fused call a step: every parameter at the same step count
    losses = [r["train_loss"] for r in metrics(tmp_path / "tri") if "train_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def _trainer(tmp_path, kernels, device, *extra):
    """A set-up smoke-preset Trainer on random tokens (no shared data needed: the GPU box has none)."""
    from train.trainer import Trainer

    token_file = tmp_path / "random.bin"
    np.random.default_rng(0).integers(0, 512, 20_000).astype(np.uint16).tofile(token_file)

    _, model_cfg, run_cfg, _ = resolve(
        [
            "--preset",
            "smoke",
            "--kernels",
            kernels,
            "--device",
            device,
            "--train-data",
            str(token_file),
            "--out-dir",
            str(tmp_path),
            "--run-name",
            f"sync-{kernels}",
            "--max-steps",
            "4",
            "--grad-accum",
            "2",
            "--batch-size",
            "4",
            "--context-length",
            "32",
            *extra,
        ]
    )
    t = Trainer(model_cfg, run_cfg, "smoke", progress=False)
    t.setup()
    return t


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_train_step_reads_nothing_back_from_the_device(tmp_path, kernels, monkeypatch):
    # A host sync shows up as aten::_local_scalar_dense (.item(), int(t), bool(t), `if t:`) or a
    # device-to-host copy; a step (2 micro-batches, clipping, AdamW) must dispatch neither. The CPU
    # token-range check is the one allowed read (on a GPU it is an async device assert). The GPU
    # version below runs the same step under torch.cuda.set_sync_debug_mode("error").
    import traceback

    import torch

    from bench.op_count import dispatched_ops

    if kernels == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    t = _trainer(tmp_path, kernels, "cpu")
    where = []

    def host_read(func, args, kwargs):
        if func.name() not in ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero", "aten::equal"):
            return False
        if "_check_tokens" in [f.name for f in traceback.extract_stack()]:
            return False
        where.append(traceback.format_stack(limit=8)[:-1])
        return True

    loss_acc = torch.zeros(())
    micro = t.batches.micro_batches(0, 0, 1, 2, t.device)
    before = [p.detach().clone() for p in t.raw_model.parameters()]
    with dispatched_ops(host_read) as reads:
        loss, grad_norm = t.train_step(micro, loss_acc)
    assert not reads, (reads[0], where[0])
    assert loss.dim() == 0 and grad_norm.dim() == 0 and loss_acc.item() > 0
    assert all(p.grad is None for p in t.raw_model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, t.raw_model.parameters()))
    t.close()


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_train_step_without_host_sync_on_gpu(tmp_path, kernels):
    # Batches made as the prefetcher makes them (pinned host memory, non-blocking copies), then
    # a bf16 step; any synchronising CUDA call raises. The first step runs unchecked: it autotunes
    # (timing candidates synchronises) and builds the fused AdamW's launch tables.
    import torch

    t = _trainer(tmp_path, kernels, "cuda")
    loss_acc = torch.zeros((), device=t.device)
    for step in range(3):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            t.train_step(t.batches.micro_batches(step, 0, 1, 2, t.device), loss_acc)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loss_acc.item())
    t.close()


def test_no_data_error_says_what_to_pass(tmp_path, capsys):
    assert train_main(SMOKE + ["--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--train-data" in err and "--train-text" in err and "--dataset" in err


def test_data_paths_and_durations_that_cannot_work_are_named(tmp_path, capsys):
    """An empty token file (what encoding an empty text gives), a directory given as a file, a
    negative step count: one line each, naming the file or the setting."""
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    cases = [
        (["--train-data", str(empty)], f"{empty}: the token file is empty"),
        (["--train-data", str(tmp_path)], "token file is a directory, not a file"),
        (["--train-text", str(tmp_path)], "text file is a directory, not a file"),
        (["--config", str(tmp_path)], "is a directory, not a file"),
        (["--train-data", str(empty), "--max-steps", "-3"], "max_steps must not be negative"),
    ]
    for argv, msg in cases:
        assert train_main(SMOKE + ["--out-dir", str(tmp_path / "runs"), *argv]) == 1, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)


def test_config_file_and_flags_override_the_preset(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nd_model = 96\nnum_heads = 4\n[run]\nlr = 0.01\n")
    _, model, run, _ = resolve(["--preset", "smoke", "--config", str(cfg), "--lr", "0.02", "--no-use-rope"])
    assert model.d_model == 96 and model.use_rope is False and run.lr == 0.02
    with pytest.raises(ValueError, match="divisible"):
        resolve(["--preset", "smoke", "--d-model", "30"])
    with pytest.raises(SystemExit):
        resolve(["--preset", "nope"])


def test_compile_mode_flag_reaches_torch_compile(monkeypatch):
    import torch

    from train.config import compile_model

    _, _, run, _ = resolve(["--preset", "smoke", "--compile", "--compile-mode", "reduce-overhead"])
    assert run.compile and run.compile_mode == "reduce-overhead"
    with pytest.raises(ValueError, match="reduce-overhead"):
        resolve(["--preset", "smoke", "--compile-mode", "fastest"])
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: seen.append(mode) or model)
    net = torch.nn.Linear(2, 2)
    assert compile_model(net, "reduce-overhead") is net and compile_model(net) is net
    assert seen == ["reduce-overhead", None]


def test_presets_match_the_handout():
    _, m, r, _ = resolve(["--preset", "tinystories"])
    assert (m.vocab_size, m.context_length, m.d_model, m.num_layers, m.num_heads, m.d_ff, m.rope_theta) == (
        10000,
        256,
        512,
        4,
        16,
        1344,
        10000.0,
    )
    assert r.batch_size == 64 and r.max_tokens == 327_680_000
    _, xl, _, _ = resolve(["--preset", "gpt2-xl"])
    assert (xl.d_model, xl.num_layers, xl.num_heads, xl.d_ff) == (1600, 48, 25, 6400)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours Range requests (and can drop a connection midway)."""

    cut_after: int | None = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_after is not None and not rng:
            self.wfile.write(body[: type(self).cut_after])
            return
        self.wfile.write(body)


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    _RangeHandler.cut_after = None


def test_download_resumes_and_checks_size(tmp_path, http_root):
    root, url = http_root
    payload = os.urandom(300_000)
    (root / "f.bin").write_bytes(payload)
    _RangeHandler.cut_after = 100_000
    with pytest.raises(ConnectionError, match="incomplete"):
        download(f"{url}/f.bin", tmp_path / "f.bin", progress=False, chunk=4096)
    assert (tmp_path / "f.bin.part").stat().st_size == 100_000 and not (tmp_path / "f.bin").exists()
    _RangeHandler.cut_after = None
    download(f"{url}/f.bin", tmp_path / "f.bin", progress=False)
    assert (tmp_path / "f.bin").read_bytes() == payload


def test_dataset_download_via_mirror_then_train(tmp_path, http_root, shared_data):
    import gzip

    root, url = http_root
    text = (shared_data / "corpus.en").read_text()
    base = root / "datasets" / "stanford-cs336" / "owt-sample" / "resolve" / "main"
    base.mkdir(parents=True)
    (base / "owt_train.txt.gz").write_bytes(gzip.compress(text[:100_000].encode()))
    (base / "owt_valid.txt.gz").write_bytes(gzip.compress(text[100_000:].encode()))
    train_txt, valid_txt = fetch_dataset("owt", tmp_path / "data", mirror=url, progress=False)
    assert train_txt.read_text() == text[:100_000]
    code = train_main(
        SMOKE
        + [
            "--dataset",
            "owt",
            "--dataset-mirror",
            url,
            "--data-dir",
            str(tmp_path / "data"),
            "--out-dir",
            str(tmp_path / "runs"),
            "--run-name",
            "owt",
            "--max-steps",
            "5",
            "--sample-tokens",
            "0",
        ]
    )
    assert code == 0


def test_dataset_without_network_explains(tmp_path):
    with pytest.raises(ConnectionError, match="--train-text"):
        fetch_dataset("tinystories", tmp_path, mirror="http://127.0.0.1:9", progress=False)


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path, token_file):
    common = [
        "-m",
        "train",
        *SMOKE,
        "--train-data",
        str(token_file),
        "--max-steps",
        "4",
        "--log-interval",
        "1",
        "--eval-interval",
        "100",
        "--sample-tokens",
        "0",
        "--batch-size",
        "8",
        "--out-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *common, "--run-name", "one"], cwd=ROOT, env=env, capture_output=True, timeout=300
    )
    assert one.returncode == 0, one.stderr.decode()
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            *common,
            "--run-name",
            "two",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a = [r["train_loss"] for r in metrics(tmp_path / "one")]
    b = [r["train_loss"] for r in metrics(tmp_path / "two")]
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_fsdp_two_gloo_processes_match_one_process_and_resume(tmp_path, token_file):
    common = [
        "-m",
        "train",
        *SMOKE,
        "--train-data",
        str(token_file),
        "--log-interval",
        "1",
        "--eval-interval",
        "100",
        "--sample-tokens",
        "0",
        "--batch-size",
        "8",
        "--checkpoint-interval",
        "2",
        "--out-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, *common, "--max-steps", "6", "--run-name", "one"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr.decode()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534"]
    for steps in ("4", "6"):  # the second run resumes the sharded run from its full checkpoint
        r = subprocess.run(
            [*torchrun, *common, "--max-steps", steps, "--run-name", "fsdp", "--fsdp"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr.decode()[-3000:]
    a = [r["train_loss"] for r in metrics(tmp_path / "one")]
    b = [r["train_loss"] for r in metrics(tmp_path / "fsdp")]
    np.testing.assert_allclose(b, a, rtol=1e-5)
    import torch

    state = torch.load(tmp_path / "fsdp" / "checkpoints" / "step_00000006.pt", weights_only=False)
    assert type(state["model"]["lm_head.weight"]) is torch.Tensor and state["optimizer_format"] == "fqn"
    # A sharded run's checkpoint loads into a plain model.
    from model import TransformerLM
    from train.cli import resolve

    _, cfg, _, _ = resolve(["--preset", "smoke"])
    from train import load_checkpoint

    assert load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "step_00000006.pt", TransformerLM(cfg)) == 6


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        resolve(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--d-model", "--no-use-rope", "--time-budget", "--grad-accum", "--fsdp", "--dataset-mirror"):
        assert flag in out
    assert "[default preset: 1344]" in out


def test_generate_and_plot_commands(tmp_path, shared_data, capsys, monkeypatch):
    from train.generate import main as generate_main
    from train.plot import main as plot_main

    run = tmp_path / "runs" / "g"
    assert (
        train_main(
            SMOKE
            + [
                "--train-text",
                str(shared_data / "corpus.en"),
                "--data-dir",
                str(tmp_path / "data"),
                "--out-dir",
                str(tmp_path / "runs"),
                "--run-name",
                "g",
                "--max-steps",
                "20",
                "--log-interval",
                "5",
                "--eval-interval",
                "10",
                "--sample-tokens",
                "0",
            ]
        )
        == 0
    )
    ckpt = sorted((run / "checkpoints").glob("*.pt"))[-1]
    capsys.readouterr()
    assert (
        generate_main(
            [
                "--checkpoint",
                str(ckpt),
                "--prompt",
                "The history of",
                "--max-new-tokens",
                "12",
                "--num-samples",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("The history of") == 2
    assert generate_main(["--checkpoint", str(tmp_path / "none.pt")]) == 1
    capsys.readouterr()
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as a user's CPU run: no interpreter to fall back on
    for argv, msg in [
        (["--num-samples", "0"], "--num-samples must be at least 1"),
        (["--kernels", "triton", "--device", "cpu"], "--kernels triton needs a CUDA GPU"),
    ]:
        assert generate_main(["--checkpoint", str(ckpt), *argv]) == 1, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
    assert plot_main([str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "d.png")]) == 1
