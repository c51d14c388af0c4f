"""The training loop behind ``python -m train``.

One ``Trainer`` owns a run directory: ``config.json`` (resolved model and run settings),
``env.json`` (device, versions, git commit), ``metrics.jsonl``, ``checkpoints/`` and ``samples.txt``.
The loop does no host-device sync except at log intervals (losses are accumulated on the device),
batches are prefetched by a background thread from pinned memory, and every batch is a function of
(seed, step), so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import queue
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from kernels import interpreting
from model import ModelConfig, TransformerLM
from model.flops import training_flops_per_token
from train.checkpoint import (
    check_compatible,
    gather_state_dicts,
    load_checkpoint_state,
    load_optimizer_state,
    save_checkpoint,
    unwrap_model,
)
from train.config import RunConfig, compile_model
from train.data import batch_from_starts
from train.data_prep import prepare_data
from train.devices import device_name, lookup_peak
from train.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown, wrap_model
from train.optimizer import AdamW, clip_and_step, get_lr_cosine_schedule
from train.provenance import provenance

EXIT_OK, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3


class TrainingDiverged(RuntimeError):
    pass


def resolve_device(requested: str | None) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested} requested but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_kernels(kernels: str, device: torch.device) -> None:
    if kernels == "triton" and device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "--kernels triton needs a CUDA GPU, and this run is on the CPU. "
            "Use --kernels torch on a CPU (the from-scratch PyTorch reference backend)."
        )


class BatchSource:
    """Batches as a pure function of (seed, step): the global batch's window starts come from
    ``default_rng([seed, step])``, and each rank (and micro-step) takes its own slice of them."""

    def __init__(self, tokens: np.ndarray, context_length: int, batch_size: int, seed: int):
        if len(tokens) < context_length + 1:
            raise ValueError(
                f"training data has {len(tokens)} tokens; context_length {context_length} needs at least {context_length + 1}"
            )
        self.tokens, self.t, self.b, self.seed = tokens, context_length, batch_size, seed

    def starts(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, step]).integers(0, len(self.tokens) - self.t, size=self.b)

    def micro_batches(self, step: int, rank: int, world: int, accum: int, device: torch.device):
        starts = self.starts(step)
        per = self.b // (world * accum)
        mine = starts[rank * per * accum : (rank + 1) * per * accum]
        return [batch_from_starts(self.tokens, mine[i * per : (i + 1) * per], self.t, device) for i in range(accum)]


class Prefetcher:
    """Builds the next steps' batches on a background thread (gather, pin, async copy)."""

    def __init__(self, make, first_step: int, last_step: int, depth: int = 2):
        self.make, self.q = make, queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(first_step, last_step), daemon=True)
        self.thread.start()

    def _run(self, first: int, last: int) -> None:
        for step in range(first, last):
            if self.stop.is_set():
                return
            try:
                item = (step, self.make(step), None)
            except BaseException as e:  # surface errors in the training thread
                item = (step, None, e)
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def get(self, step: int):
        got, batches, err = self.q.get()
        if err is not None:
            raise err
        assert got == step, f"prefetcher out of order: {got} != {step}"
        return batches

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, run: RunConfig, preset_name: str = "custom", progress: bool = True):
        self.model_cfg, self.run, self.preset_name, self.progress = model_cfg, run, preset_name, progress
        self.device = resolve_device(run.device)
        check_kernels(run.kernels, self.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if run.batch_size % (self.dist.world_size * run.grad_accum):
            raise ValueError(
                f"batch_size {run.batch_size} must be divisible by world_size x grad_accum = {self.dist.world_size * run.grad_accum}"
            )
        self.stop_signal: str | None = None
        self.status = "not started"

    # --- set-up -----------------------------------------------------------------------------

    def _run_dir(self) -> Path:
        name = self.run.run_name or f"{self.preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return Path(self.run.out_dir) / name

    def _max_steps(self) -> int:
        r, t = self.run, self.model_cfg.context_length
        if r.max_steps is not None:
            return r.max_steps
        if r.max_tokens is not None:
            return max(1, math.ceil(r.max_tokens / (r.batch_size * t)))
        if r.time_budget is not None:
            return 10**12
        raise ValueError("set a duration: --max-steps, --max-tokens or --time-budget")

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. under some test runners)
                pass

    def setup(self) -> None:
        r = self.run
        torch.manual_seed(r.seed)
        self.data = prepare_data(r, self.model_cfg, progress=self.progress and self.dist.is_main)
        if len(self.data.valid) < self.model_cfg.context_length + 1:
            raise ValueError(
                f"validation data has {len(self.data.valid)} tokens; need at least {self.model_cfg.context_length + 1}"
            )
        vmax = int(self.data.train[: 1 << 20].max())
        if vmax >= self.model_cfg.vocab_size:
            raise ValueError(
                f"training tokens reach id {vmax}, beyond the model's vocab_size {self.model_cfg.vocab_size}"
            )
        self.max_steps = self._max_steps()
        self.run_dir = self._run_dir()
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.dist.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        self.raw_model = TransformerLM(self.model_cfg, kernels=r.kernels).to(self.device)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.best_val = float("inf")
        self.sharded = r.fsdp and self.dist.enabled
        state = self._resume_state()
        if state is not None:  # full weights go in before sharding; FSDP2 then splits them
            check_compatible(self.raw_model, state["model"])
            self.raw_model.load_state_dict(state["model"])
        self.model = wrap_model(self.raw_model, self.dist, self.device, r.fsdp)
        # The optimizer is built on the wrapped model's parameters (FSDP2 swaps in sharded ones).
        # --kernels triton: the fused AdamW kernel too (it falls back to foreach for FSDP2's shards).
        self.optimizer = AdamW(
            self.model.parameters(),
            lr=r.lr,
            betas=(r.beta1, r.beta2),
            eps=r.eps,
            weight_decay=r.weight_decay,
            fused=r.kernels == "triton",
        )
        if state is not None:
            self._restore(state)
        self.forward = compile_model(self.model, r.compile_mode) if r.compile else self.model
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and r.dtype == "bf16"
            else nullcontext()
        )
        self.batches = BatchSource(self.data.train, self.model_cfg.context_length, r.batch_size, r.seed)
        rng = np.random.default_rng([r.seed, 2**31 - 1])
        per_rank = max(1, r.batch_size // self.dist.world_size)
        self.eval_starts = [
            rng.integers(0, len(self.data.valid) - self.model_cfg.context_length, size=per_rank * self.dist.world_size)
            for _ in range(r.eval_batches)
        ]
        self.flops_per_token = training_flops_per_token(self.model_cfg)
        peak = lookup_peak(device_name(self.device)) if self.device.type == "cuda" else None
        self.peak_flops = peak.bf16_tflops * 1e12 if peak else None
        if self.dist.is_main:
            self._write_json(
                "config.json",
                {
                    "preset": self.preset_name,
                    "model": self.model_cfg.to_dict(),
                    "run": r.to_dict(),
                    "max_steps": self.max_steps,
                    "world_size": self.dist.world_size,
                    "flops_per_token": self.flops_per_token,
                    "tokenizer_dir": self.data.tokenizer_dir,
                    "params": self.raw_model.num_parameters(),
                },
            )
            env = provenance(self.device)
            env["peak_bf16_tflops"] = peak.bf16_tflops if peak else None
            env["peak_source"] = peak.source if peak else None
            self._write_json("env.json", env)
        self._install_signal_handlers()
        self.wandb = None
        if r.wandb and self.dist.is_main:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=r.wandb_project,
                    name=self.run_dir.name,
                    config={"model": self.model_cfg.to_dict(), "run": r.to_dict()},
                )
            except ImportError:
                print("warning: --wandb given but the wandb package is not installed; skipping", file=sys.stderr)

    def _write_json(self, name: str, obj) -> None:
        (self.run_dir / name).write_text(json.dumps(obj, indent=2, default=str))

    # --- checkpoints --------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("step_*.pt"))

    def _resume_state(self) -> dict | None:
        r = self.run
        if r.resume == "never":
            return None
        if r.resume == "auto":
            found = self._checkpoints()
            if not found:
                return None
            path = found[-1]
        else:
            path = Path(r.resume)
        state = load_checkpoint_state(path, map_location="cpu" if self.sharded else self.device)
        state["path"] = str(path)
        return state

    def _restore(self, state: dict) -> None:
        load_optimizer_state(
            self.model, self.optimizer, state["optimizer"], state.get("optimizer_format", "index"), self.sharded
        )
        path = state["path"]
        self.step = int(state["iteration"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.best_val = float(state.get("best_val", float("inf")))
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def save(self) -> Path | None:
        model_sd, optim_sd, fmt = gather_state_dicts(self.model, self.optimizer, self.sharded)
        if not self.dist.is_main:
            barrier(self.dist)
            return None
        path = self.ckpt_dir / f"step_{self.step:08d}.pt"
        save_checkpoint(
            self.raw_model,
            None,
            self.step,
            path,
            model_state=model_sd,
            optimizer_state=optim_sd,
            optimizer_format=fmt,
            tokens_seen=self.tokens_seen,
            elapsed=self.elapsed_before + (time.time() - self.t_start),
            best_val=self.best_val,
            rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            run_config=self.run.to_dict(),
            tokenizer_dir=self.data.tokenizer_dir,
        )
        for old in self._checkpoints()[: -self.run.keep_checkpoints]:
            old.unlink(missing_ok=True)
        barrier(self.dist)
        return path

    # --- the loop -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        per = len(self.eval_starts[0]) // self.dist.world_size
        for starts in self.eval_starts:
            mine = starts[self.dist.rank * per : (self.dist.rank + 1) * per]
            x, y = batch_from_starts(self.data.valid, mine, self.model_cfg.context_length, self.device)
            with self.autocast:
                total += self.forward(x, targets=y).float()
        self.model.train()
        return all_reduce_mean(total / len(self.eval_starts), self.dist).item()

    def _lr(self, step: int) -> float:
        r = self.run
        decay = r.lr_decay_iters or self.max_steps
        return get_lr_cosine_schedule(step, r.lr, r.min_lr, r.warmup_iters, decay)

    def train_step(
        self, micro: list[tuple[torch.Tensor, torch.Tensor]], loss_acc: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over a step's micro-batches: forward and backward of each (DDP
        all-reduces on the last), clipping, AdamW, gradients freed. Adds the step's mean loss into
        ``loss_acc`` on the device and returns (last micro-batch's loss, grad norm before clipping),
        both device tensors: nothing here waits for the GPU (a GPU test runs it under
        ``torch.cuda.set_sync_debug_mode("error")``)."""
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            ctx = (
                self.model.no_sync()
                if (self.dist.enabled and not last and hasattr(self.model, "no_sync"))
                else nullcontext()
            )
            with ctx, self.autocast:
                loss = self.forward(x, targets=y)
            (loss / len(micro)).backward()
            loss_acc += loss.detach().float() / len(micro)
        grad_norm = clip_and_step(self.optimizer, self.run.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def train(self) -> int:
        r = self.run
        self.t_start = time.time()
        first_step = self.step
        tokens_per_step = r.batch_size * self.model_cfg.context_length
        make = lambda s: self.batches.micro_batches(s, self.dist.rank, self.dist.world_size, r.grad_accum, self.device)  # noqa: E731
        prefetch = Prefetcher(make, self.step, self.max_steps)
        # A resumed run appends to its metrics; a fresh one (no checkpoint loaded) starts them over.
        mode = "a" if self.step > 0 else "w"
        metrics = open(self.run_dir / "metrics.jsonl", mode) if self.dist.is_main else None
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        loss_acc = torch.zeros((), device=self.device)
        acc_steps, t_log, status, eval_seconds = 0, time.time(), "finished", 0.0
        last_val = None
        try:
            while self.step < self.max_steps:
                lr = self._lr(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                loss, grad_norm = self.train_step(prefetch.get(self.step), loss_acc)
                self.step += 1
                acc_steps += 1
                self.tokens_seen += tokens_per_step
                if bar is not None:
                    bar.update(1)
                last = self.step == self.max_steps
                elapsed = self.elapsed_before + time.time() - self.t_start
                out_of_time = False
                if r.time_budget is not None:
                    per_step = (time.time() - self.t_start) / max(1, self.step - first_step)
                    reserve = 3 * per_step + eval_seconds + 5.0
                    out_of_time = elapsed + reserve >= r.time_budget
                stop = last or out_of_time or self.stop_signal is not None
                log_due = self.step % r.log_interval == 0 or stop
                eval_due = self.step % r.eval_interval == 0 or stop
                record = {"step": self.step, "tokens": self.tokens_seen}
                if log_due:
                    train_loss = all_reduce_mean(loss_acc / acc_steps, self.dist).item()
                    if not math.isfinite(train_loss):
                        raise TrainingDiverged(
                            f"non-finite training loss ({train_loss}) at step {self.step}; the last good checkpoint is kept in {self.ckpt_dir}. "
                            "Try a lower --lr, a smaller --grad-clip, or --dtype fp32."
                        )
                    dt = time.time() - t_log
                    tok_s = acc_steps * tokens_per_step / dt
                    record.update(
                        {
                            "train_loss": train_loss,
                            "lr": lr,
                            "grad_norm": grad_norm.item() if grad_norm is not None else None,
                            "tokens_per_s": tok_s,
                            "step_time_ms": 1000 * dt / acc_steps,
                            "mfu": tok_s * self.flops_per_token / self.peak_flops if self.peak_flops else None,
                            "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30
                            if self.device.type == "cuda"
                            else None,
                        }
                    )
                record["wall_time"] = elapsed
                if eval_due:
                    t_eval = time.time()
                    last_val = self.evaluate()
                    eval_seconds = time.time() - t_eval
                    record["val_loss"] = last_val
                    self.best_val = min(self.best_val, last_val)
                if log_due or eval_due:
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    if self.wandb is not None:
                        self.wandb.log(record, step=self.step)
                if log_due:
                    if bar is not None:
                        post = {"loss": f"{train_loss:.3f}", "tok/s": f"{tok_s:,.0f}"}
                        if record["mfu"] is not None:
                            post["mfu"] = f"{100 * record['mfu']:.1f}%"
                        if last_val is not None:
                            post["val"] = f"{last_val:.3f}"
                        bar.set_postfix(post)
                    loss_acc.zero_()
                    acc_steps, t_log = 0, time.time()
                if stop or self.step % r.checkpoint_interval == 0:
                    if not stop:
                        # Never checkpoint a diverged state: check the loss before saving.
                        if not math.isfinite(loss.item()):
                            raise TrainingDiverged(
                                f"non-finite training loss at step {self.step}; the last good checkpoint is kept in {self.ckpt_dir}"
                            )
                    self.save()
                if stop:
                    if self.stop_signal is not None and not last:
                        status = f"interrupted by {self.stop_signal}"
                    elif out_of_time and not last:
                        status = "time budget reached"
                    break
        except TrainingDiverged as e:
            status = "diverged"
            if self.dist.is_main:
                print(f"error: {e}", file=sys.stderr)
        finally:
            prefetch.close()
            if bar is not None:
                bar.close()
            if metrics is not None:
                metrics.close()
        self.status = status
        if self.dist.is_main:
            summary = {
                "status": status,
                "step": self.step,
                "tokens": self.tokens_seen,
                "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                "final_val_loss": last_val,
                "wall_time": self.elapsed_before + time.time() - self.t_start,
            }
            self._write_json("summary.json", summary)
            if status in ("finished", "time budget reached") and r.sample_tokens > 0:
                self.write_samples()
        if status == "diverged":
            return EXIT_DIVERGED
        if status.startswith("interrupted"):
            return EXIT_INTERRUPTED
        return EXIT_OK

    def write_samples(self) -> None:
        from train.generate import load_tokenizer_for, sample_text

        tok = load_tokenizer_for(self.data.tokenizer_dir)
        if tok is None:
            print("note: no tokenizer known for this data (pass --tokenizer DIR); skipping samples", file=sys.stderr)
            return
        texts = sample_text(
            unwrap_model(self.raw_model),
            tok,
            self.run.sample_prompt,
            self.run.num_samples,
            self.run.sample_tokens,
            self.run.temperature,
            self.run.top_p,
            self.run.special_token,
            seed=self.run.seed,
        )
        with open(self.run_dir / "samples.txt", "w") as f:
            for i, t in enumerate(texts):
                f.write(f"=== sample {i} (step {self.step}) ===\n{t}\n\n")

    def close(self) -> None:
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
        shutdown(self.dist)
