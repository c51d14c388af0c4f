"""The training loop behind ``python -m train``.

A ``Trainer`` owns one run directory (``train.run_dir``). ``setup`` takes it, prepares the data,
builds the model and optimizer and resumes from the newest usable checkpoint; ``train`` runs the
loop: ``train_step`` (forward, backward, clip, AdamW), then ``_log`` (metrics at log intervals),
``_evaluate_if_due`` and ``save`` (checkpoints), until the last step, a signal or the time budget
(``train.stopping``). The loop reads nothing back from the device except at log intervals, evals
and checkpoints (losses are accumulated on the device), batches are prefetched by a background
thread, and every batch is a function of (seed, step), so a resumed run sees exactly the data an
uninterrupted one would. How a run ends, and its exit code: ``train.errors``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from kernels import interpreting
from model import ModelConfig, TransformerLM
from model.flops import training_flops_per_token
from train.checkpoint import (
    all_finite,
    check_compatible,
    find_resumable,
    gather_state_dicts,
    list_checkpoints,
    load_checkpoint_state,
    load_optimizer_state,
    prune_checkpoints,
    save_checkpoint,
    unwrap_model,
)
from train.config import RunConfig, compile_model, resume_differences
from train.data import BatchSource, Prefetcher, batch_from_starts
from train.data_prep import prepare_data
from train.devices import device_name, lookup_peak, model_flops_utilization
from train.distributed import (
    DistInfo,
    all_ranks,
    all_reduce_mean,
    barrier,
    init_distributed,
    shutdown,
    wrap_model,
)
from train.errors import STATUS_EXIT, TrainingDiverged, UserError
from train.optimizer import AdamW, clip_and_step, get_lr_cosine_schedule, grad_norm_and_clip_scale
from train.progress import Progress, closing_summary
from train.provenance import provenance
from train.run_dir import USER_OS_ERRNOS, RunDir, describe_os_error
from train.stopping import StopControl

# Settings holding paths: compared on resume as absolute paths, whatever directory the run starts in.
PATH_SETTINGS = ("train_data", "valid_data", "train_text", "valid_text", "tokenizer", "init_from")


def resolve_device(requested: str | None) -> torch.device:
    if requested:
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but no CUDA GPU is available")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_kernels(kernels: str, device: torch.device) -> None:
    if kernels == "triton" and device.type != "cuda" and not interpreting():
        raise UserError(
            "--kernels triton needs a CUDA GPU, and this run is on the CPU. "
            "Use --kernels torch on a CPU (the from-scratch PyTorch reference backend)."
        )


def tokenizer_fingerprint(tokenizer_dir: str | os.PathLike | None) -> str | None:
    """sha256 over a saved tokenizer's files (vocab, merges, special tokens)."""
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        return None
    h = hashlib.sha256()
    for name in ("vocab.json", "merges.txt", "special_tokens.json"):
        p = Path(tokenizer_dir) / name
        h.update(name.encode() + (p.read_bytes() if p.exists() else b""))
    return h.hexdigest()


def tokenizer_size(tokenizer_dir: str | os.PathLike | None) -> int | None:
    """Ids a saved tokenizer can produce (its vocab plus special tokens), or None if unknown."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "vocab.json").exists():
        return None
    from tokenizer import Tokenizer

    return max(Tokenizer.load(tokenizer_dir).vocab) + 1


class Trainer:
    def __init__(
        self,
        model_cfg: ModelConfig,
        run: RunConfig,
        preset_name: str = "custom",
        progress: str | bool = "auto",
        process_start: float | None = None,
    ):
        self.model_cfg, self.run, self.preset_name = model_cfg, run, preset_name
        # progress: "auto" (a bar on a terminal, plain lines elsewhere), "bar", "lines", "quiet";
        # True/False are "auto"/"quiet".
        self.progress_mode = {True: "auto", False: "quiet"}.get(progress, progress)
        if run.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
            torch.use_deterministic_algorithms(True)
            torch.set_num_threads(1)
        self.device = resolve_device(run.device)
        check_kernels(run.kernels, self.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if run.batch_size % (self.dist.world_size * run.grad_accum):
            raise UserError(
                f"--batch-size {run.batch_size} must be divisible by world size x --grad-accum "
                f"= {self.dist.world_size * run.grad_accum}"
            )
        self.stopper = StopControl(run.time_budget, process_start or time.time(), self.dist.enabled)
        self.stopper.install()
        self.status = "not started"
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.training_started = False  # set by train(): record_failure keeps an earlier summary until then
        self.best_val, self.last_val, self.last_train = float("inf"), None, None
        self.run_dir = RunDir(Path(run.out_dir) / self._run_name(), self.dist.is_main)
        self.wandb = None

    # --- set-up -----------------------------------------------------------------------------

    def _run_name(self) -> str:
        return self.run.run_name or f"{self.preset_name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def _max_steps(self) -> int:
        r, t = self.run, self.model_cfg.context_length
        if r.max_steps is not None:
            return r.max_steps
        if r.max_tokens is not None:
            return max(1, math.ceil(r.max_tokens / (r.batch_size * t)))
        if r.time_budget is not None:
            return 10**12
        raise UserError("set a duration: --max-steps, --max-tokens or --time-budget")

    def setup(self) -> None:
        r = self.run
        torch.manual_seed(r.seed)
        self.run_dir.prepare(fresh=r.resume == "never")
        barrier(self.dist)
        self.data = self._prepare_data()
        self.max_steps = self._max_steps()
        self.raw_model = TransformerLM(self.model_cfg, kernels=r.kernels).to(self.device)
        self.sharded = r.fsdp and self.dist.enabled
        state = self._resume_state()  # before the run directory changes: a refused resume touches nothing
        self._adopt_tokenizer()
        if state is not None:  # full weights go in before sharding; FSDP2 then splits them
            try:
                check_compatible(self.raw_model, state["model"])
            except ValueError as e:
                raise UserError(f"{state['path']}: {e}") from None
            self.raw_model.load_state_dict(state["model"])
        elif r.init_from:  # a fresh run starts from a Llama directory's weights (q/k rows permuted back)
            from train.hf_llama import read_llama_weights

            try:
                self.raw_model.load_state_dict(read_llama_weights(r.init_from, self.model_cfg))
            except ValueError as e:
                raise UserError(f"--init-from {r.init_from}: {e}") from None
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
        self.loss_acc, self.acc_steps = torch.zeros((), device=self.device), 0
        if state is not None:
            self._restore(state)
        self.forward = compile_model(self.model, r.compile_mode) if r.compile else self.model
        on_gpu_bf16 = self.device.type == "cuda" and r.dtype == "bf16"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu_bf16 else nullcontext()
        self.batches = BatchSource(
            self.data.train, self.model_cfg.context_length, r.batch_size, r.seed
        )  # checked above
        self.eval_starts = self._eval_starts()
        self.flops_per_token = training_flops_per_token(self.model_cfg)
        self.peak = lookup_peak(device_name(self.device)) if self.device.type == "cuda" else None
        # MFU against the peak of what the matmuls compute in: bf16 tensor cores under autocast,
        # plain fp32 otherwise (CPU runs report none).
        self.compute_dtype = "bf16" if on_gpu_bf16 else "fp32"
        if self.dist.is_main:
            self._write_run_files(state)
        if r.wandb and self.dist.is_main:
            self._start_wandb()

    def _prepare_data(self):
        """Token arrays for the run, the tokenizer copied into the run directory, and the model's
        vocabulary sized to that tokenizer (a model that can sample ids its tokenizer cannot
        decode is never built)."""
        try:
            data = prepare_data(self.run, self.model_cfg, progress=self.progress_mode != "quiet" and self.dist.is_main)
        except OSError as e:
            if e.errno in USER_OS_ERRNOS:
                raise describe_os_error(e, "data cache", self.run.data_dir, "choose another with --data-dir") from None
            raise
        except ValueError as e:  # what data preparation refuses is the input: a file, a flag
            raise UserError(str(e)) from None
        ctx = self.model_cfg.context_length
        for split, tokens in (("training", data.train), ("validation", data.valid)):
            if len(tokens) < ctx + 1:
                raise UserError(f"{split} data has {len(tokens)} tokens; --context-length {ctx} needs {ctx + 1}")
        if data.tokenizer_dir is not None and not Path(data.tokenizer_dir).is_dir():
            data.tokenizer_dir = None
        size = tokenizer_size(data.tokenizer_dir)
        # --init-from: the weights fix the vocab size (a Llama's may exceed its tokenizer's ids).
        if size is not None and size != self.model_cfg.vocab_size and not self.run.init_from:
            if self.dist.is_main:
                print(
                    f"note: the tokenizer has {size} ids; the model's vocab_size follows it "
                    f"({self.model_cfg.vocab_size} -> {size})",
                    file=sys.stderr,
                )
            self.model_cfg.vocab_size = size
        for split, tokens in (("training", data.train), ("validation", data.valid)):
            vmax = int(tokens.max())  # the whole file: one pass at start, ~1 s a GB
            if vmax >= self.model_cfg.vocab_size:
                raise UserError(
                    f"{split} tokens reach id {vmax}, beyond the model's --vocab-size {self.model_cfg.vocab_size}"
                )
        self.data_fingerprint = {
            "train_tokens": len(data.train),
            "valid_tokens": len(data.valid),
            "tokenizer_sha256": tokenizer_fingerprint(data.tokenizer_dir),
        }
        return data

    def _adopt_tokenizer(self) -> None:
        """The run directory's own copy of the data's tokenizer (replaced only when it differs)."""
        if self.data.tokenizer_dir is None:
            return
        if self.dist.is_main:
            self.run_dir.copy_tokenizer(self.data.tokenizer_dir)
        barrier(self.dist)
        self.data.tokenizer_dir = str(self.run_dir.path / "tokenizer")

    def _eval_starts(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.run.seed, 2**31 - 1])
        n = max(1, self.run.batch_size // self.dist.world_size) * self.dist.world_size
        hi = len(self.data.valid) - self.model_cfg.context_length
        return [rng.integers(0, hi, size=n) for _ in range(self.run.eval_batches)]

    def settings(self) -> dict:
        """The run's model and run settings, paths made absolute: what a resume is checked against."""
        run = self.run.to_dict()
        for k in PATH_SETTINGS:
            if run.get(k):
                run[k] = os.path.abspath(run[k])
        return {"model": self.model_cfg.to_dict(), "run": run, "data": self.data_fingerprint}

    def _write_run_files(self, state: dict | None) -> None:
        previous = self.run_dir.read_json("config.json") or {}
        resumes = previous.get("resumes", []) if state is not None else []
        if state is not None:
            resumes.append({"step": self.step, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": self.changed})
        self.run_dir.write_json(
            "config.json",
            {
                "preset": self.preset_name,
                "model": self.model_cfg.to_dict(),
                "run": self.run.to_dict(),
                "max_steps": self.max_steps,
                "world_size": self.dist.world_size,
                "flops_per_token": self.flops_per_token,
                "tokenizer_dir": "tokenizer" if self.data.tokenizer_dir else None,
                "params": self.raw_model.num_parameters(),
                "data": self.data_fingerprint,
                "resumes": resumes,
            },
        )
        env = provenance(self.device)
        peak = self.peak
        env.update(
            compute_dtype=self.compute_dtype,
            peak_tflops=peak.tflops(self.compute_dtype) if peak else None,
            peak_bf16_tflops=peak.bf16_tflops if peak else None,
            peak_source=peak.source if peak else None,
        )
        self.run_dir.write_json("env.json", env)

    def _start_wandb(self) -> None:
        try:
            import wandb
        except ImportError:
            print("warning: --wandb given but the wandb package is not installed; skipping", file=sys.stderr)
            return
        self.wandb = wandb.init(
            project=self.run.wandb_project,
            name=self.run_dir.path.name,
            config={"model": self.model_cfg.to_dict(), "run": self.run.to_dict()},
        )

    # --- resume ---------------------------------------------------------------------------------

    def _resume_state(self) -> dict | None:
        """The checkpoint to continue from (validated, settings checked), or None to start fresh."""
        r = self.run
        self.changed: list[str] = []
        if r.resume == "never":
            return None
        if r.resume == "auto":
            found = find_resumable(self.run_dir.checkpoints, self._warn)
            if found is None:
                return None
            path, state = found
        else:
            path = Path(r.resume)
            state = load_checkpoint_state(path)
            later = [p.name for s, p in list_checkpoints(self.run_dir.checkpoints) if s > int(state["iteration"])]
            if later:
                raise UserError(
                    f"{self.run_dir.checkpoints} has checkpoints after step {state['iteration']} of {path} "
                    f"({', '.join(later)}): continuing would mix two histories; pass a new --run-name"
                )
        state["path"] = str(path)
        missing = [k for k in ("optimizer", "rng_cpu", "model_config") if state.get(k) is None]
        if missing:
            raise UserError(
                f"cannot resume {path}: it holds no {', '.join(missing)} (a weights-only file?); "
                "a run can start from weights with --init-from a Hugging Face directory"
            )
        self._check_settings(state)
        return state

    def _check_settings(self, state: dict) -> None:
        saved = state.get("settings")
        if saved is None:  # format 1: the raw settings; paths as the same command would make them
            run = dict(state.get("run_config") or {})
            for k in PATH_SETTINGS:
                if run.get(k):
                    run[k] = os.path.abspath(run[k])
            saved = {"model": state.get("model_config"), "run": run}
        refused, allowed = resume_differences(saved, self.settings())
        old_data, new_data = saved.get("data") or {}, self.data_fingerprint
        refused += [
            f"data {k}: {old_data[k]!r} -> {new_data[k]!r}"
            for k in new_data
            if k in old_data and old_data[k] != new_data[k]
        ]
        if refused:
            raise UserError(
                f"cannot resume {state['path']}: these settings differ from the checkpoint's "
                f"({'; '.join(refused)}). Rerun with the checkpoint's settings, or pass a new --run-name"
            )
        self.changed = allowed
        if allowed and self.dist.is_main:
            print(f"note: resuming with changed settings: {'; '.join(allowed)}", file=sys.stderr)

    def _restore(self, state: dict) -> None:
        fmt = state.get("optimizer_format", "index")
        load_optimizer_state(self.model, self.optimizer, state["optimizer"], fmt, self.sharded)
        self.step = int(state["iteration"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.best_val = float(state.get("best_val", float("inf")))
        # The log interval in progress: the resumed run's next log averages the same steps.
        self.loss_acc.fill_(float(state.get("loss_acc", 0.0)))
        self.acc_steps = int(state.get("acc_steps", 0))
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        if self.dist.is_main:
            print(f"resumed from {state['path']} at step {self.step}", file=sys.stderr)

    def _warn(self, message: str) -> None:
        if self.dist.is_main:
            print(f"warning: {message}", file=sys.stderr)

    # --- checkpoints ----------------------------------------------------------------------------

    def save(self, loss: torch.Tensor | None = None, grad_norm: torch.Tensor | None = None) -> Path | None:
        """Write a checkpoint of the current step, only if the whole state is finite (parameters,
        optimizer moments, the step's loss and grad norm, and the gradients the state gives next:
        one fused check, agreed by all ranks); otherwise raise TrainingDiverged and leave the
        newest checkpoint on disk as it is."""
        probe = self._probe_gradients()
        model_sd, optim_sd, fmt = gather_state_dicts(self.model, self.optimizer, self.sharded)
        if not all_ranks(all_finite(model_sd, optim_sd, loss, grad_norm, probe), self.dist, self.device):
            raise TrainingDiverged(f"non-finite parameters, optimizer state or gradients at step {self.step}")
        if not self.dist.is_main:
            barrier(self.dist)
            return None
        path = self.run_dir.checkpoints / f"step_{self.step:08d}.pt"
        save_checkpoint(
            self.raw_model,
            None,
            self.step,
            path,
            model_state=model_sd,
            optimizer_state=optim_sd,
            optimizer_format=fmt,
            tokens_seen=self.tokens_seen,
            elapsed=self.elapsed_before + self.stopper.elapsed(),
            best_val=self.best_val,
            loss_acc=float(self.loss_acc),
            acc_steps=self.acc_steps,
            rng_cpu=torch.get_rng_state(),
            rng_cuda=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            run_config=self.run.to_dict(),
            settings=self.settings(),
            # Relative to the checkpoint's own directory: the run directory can move.
            tokenizer_dir="../tokenizer" if self.data.tokenizer_dir else None,
        )
        prune_checkpoints(self.run_dir.checkpoints, self.run.keep_checkpoints, upto_step=self.step)
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
        loss = self._forward_backward(micro, loss_acc)
        grad_norm = clip_and_step(self.optimizer, self.run.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]], loss_acc: torch.Tensor | None):
        for i, (x, y) in enumerate(micro):
            last = i == len(micro) - 1
            skip_sync = self.dist.enabled and not last and hasattr(self.model, "no_sync")
            with self.model.no_sync() if skip_sync else nullcontext(), self.autocast:
                loss = self.forward(x, targets=y)
            (loss / len(micro)).backward()
            if loss_acc is not None:
                loss_acc += loss.detach().float() / len(micro)
        return loss

    def _probe_gradients(self) -> torch.Tensor:
        """The grad norm the current state gives on the next step's batch, nothing updated: a state
        whose parameters are finite yet already doomed (non-finite gradients, as after one step at
        an absurd learning rate) is not worth a checkpoint. One extra forward and backward per
        checkpoint."""
        r = self.run
        micro = self.batches.micro_batches(self.step, self.dist.rank, self.dist.world_size, r.grad_accum, self.device)
        self._forward_backward(micro, None)
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norm, _ = grad_norm_and_clip_scale(grads, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train(self) -> int:
        """Run until the last step, a signal or the time budget; returns the exit code."""
        r = self.run
        self.stopper.enter_training()
        self.training_started = True
        first_step = self.step
        self.t_loop, self.t_log = time.time(), time.time()
        # For the time budget's reserve: the first step (compilation, warm-up) and the evals and
        # checkpoints are timed apart from the steady steps.
        self.first_step_s, self.side_s, self.eval_seconds, self.save_seconds = None, 0.0, 0.0, 0.0
        early = self.stopper.poll(0.0, sync_point=True)  # a signal some rank got during set-up
        if early in ("SIGUSR1", "SIGTERM", "SIGINT"):
            return self.finish(self._stop_status(early))
        make = lambda s: self.batches.micro_batches(s, self.dist.rank, self.dist.world_size, r.grad_accum, self.device)
        prefetch = Prefetcher(make, self.step, self.max_steps)
        self.metrics = self.run_dir.open_metrics(self.step) if self.dist.is_main else None
        self.progress = Progress(self.progress_mode, self.max_steps, self.step, enabled=self.dist.is_main)
        status = "finished"
        try:
            while self.step < self.max_steps:
                for g in self.optimizer.param_groups:
                    g["lr"] = self._lr(self.step)
                loss, grad_norm = self.train_step(prefetch.get(self.step), self.loss_acc)
                if self.first_step_s is None:
                    self.first_step_s = time.time() - self.t_loop
                self.step += 1
                self.acc_steps += 1
                self.tokens_seen += r.batch_size * self.model_cfg.context_length
                self.progress.step()
                log_due = self.step % r.log_interval == 0
                reason = self.stopper.poll(self._reserve(first_step), sync_point=log_due)
                stop = self.step == self.max_steps or reason is not None
                record = self._log(loss, grad_norm) if log_due or stop else {"step": self.step}
                self._evaluate_if_due(record, stop, reason)
                self._write_metrics(record)
                if stop or self.step % r.checkpoint_interval == 0:
                    t0 = time.time()
                    self.save(loss, grad_norm)
                    self.save_seconds = time.time() - t0
                    self.side_s += self.save_seconds
                if stop:
                    finished = reason is None or self.step == self.max_steps
                    status = "finished" if finished else self._stop_status(reason)
                    break
        except TrainingDiverged as e:
            status = "diverged"
            newest = list_checkpoints(self.run_dir.checkpoints)
            kept = f"the newest checkpoint, {newest[-1][1]}, is finite" if newest else "no checkpoint was written"
            self._warn_error(f"{e}; {kept}. Rerun with a lower --lr (it resumes from there), a smaller --grad-clip")
        finally:
            prefetch.close()
            self.progress.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.finish(status)

    def _reserve(self, first_step: int) -> float:
        """Seconds the end of a budgeted run needs: a few steps (a log interval of them where ranks
        only agree at logs), the final evaluation and checkpoint, and a margin. A step's time is
        that of the steady steps: not the first (torch.compile, autotuning), evals or checkpoints."""
        steady = self.step - first_step - 1
        if steady < 1:
            per_step = 0.0
        else:
            per_step = (time.time() - self.t_loop - self.first_step_s - self.side_s) / steady
        steps = 3 + (self.run.log_interval if self.dist.enabled else 0)
        return steps * max(0.0, per_step) + self.eval_seconds + self.save_seconds + 5.0

    def _stop_status(self, reason: str) -> str:
        return "time budget reached" if reason == "time budget" else f"interrupted by {reason}"

    def _log(self, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> dict:
        """The log interval's record (host syncs here only); divergence is caught here too."""
        train_loss = all_reduce_mean(self.loss_acc / max(1, self.acc_steps), self.dist).item()
        norm = grad_norm.item() if grad_norm is not None else None
        if not math.isfinite(train_loss) or (norm is not None and not math.isfinite(norm)):
            raise TrainingDiverged(f"non-finite training loss ({train_loss}) or grad norm ({norm}) at step {self.step}")
        dt = time.time() - self.t_log
        tokens = self.acc_steps * self.run.batch_size * self.model_cfg.context_length
        tok_s = tokens / dt if dt > 0 else None
        record = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "train_loss": train_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": norm,
            "tokens_per_s": tok_s,
            "step_time_ms": 1000 * dt / max(1, self.acc_steps),
            "mfu": model_flops_utilization(tok_s, self.flops_per_token, self.peak, self.compute_dtype),
            "peak_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
        }
        self.last_train = train_loss
        self.loss_acc.zero_()
        self.acc_steps, self.t_log = 0, time.time()
        return record

    def _evaluate_if_due(self, record: dict, stop: bool, reason: str | None) -> None:
        # SIGTERM/SIGINT give a short grace (Slurm's KillWait): checkpoint first, skip the eval.
        due = self.step % self.run.eval_interval == 0 or (stop and reason not in ("SIGTERM", "SIGINT"))
        if not due:
            return
        t0 = time.time()
        self.last_val = self.evaluate()
        self.eval_seconds = time.time() - t0
        self.side_s += self.eval_seconds
        record["val_loss"] = self.last_val
        self.best_val = min(self.best_val, self.last_val)

    def _write_metrics(self, record: dict) -> None:
        if len(record) == 1:
            return
        record["wall_time"] = self.elapsed_before + self.stopper.elapsed()
        if self.metrics is not None:
            try:
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()
            except OSError as e:
                if e.errno in USER_OS_ERRNOS:
                    raise describe_os_error(e, "metrics", self.run_dir.path / "metrics.jsonl") from None
                raise
        if self.wandb is not None:
            self.wandb.log(record, step=self.step)
        self.progress.log(record)

    # --- the end --------------------------------------------------------------------------------

    def finish(self, status: str) -> int:
        """Write summary.json (and samples when the run finished), print the closing summary and
        return the status's exit code. Also the end of a run a signal stopped during set-up."""
        self.status = status
        self.stopper.enter_training()  # a signal from here on only sets the flag
        if self.dist.is_main and self.run_dir.locked:
            self.summary = {
                "status": status,
                "exit_code": STATUS_EXIT[status],
                "step": self.step,
                "tokens": self.tokens_seen,
                "final_train_loss": self.last_train,
                "final_val_loss": self.last_val,
                "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
                "wall_time": self.stopper.elapsed(),
                "wall_time_total": self.elapsed_before + self.stopper.elapsed(),
            }
            self.run_dir.write_json("summary.json", self.summary)
            if status == "finished" and self.run.sample_tokens > 0:
                self.write_samples()
        return STATUS_EXIT[status]

    def record_failure(self, message: str, exit_code: int) -> None:
        """summary.json for a run that stopped on an error (a full disk, a bug): status "failed".
        An attempt that failed before training (a refused resume, a missing file) leaves an earlier
        attempt's summary.json alone: the run's record is still what that attempt trained, and
        Slurm's finish_job reads an unchanged summary as none, ending with this exit code."""
        if self.dist.is_main and self.run_dir.locked:
            if not self.training_started and (self.run_dir.path / "summary.json").exists():
                return
            summary = {"status": "failed", "exit_code": exit_code, "error": message, "step": self.step}
            try:
                self.run_dir.write_json("summary.json", summary)
            except (OSError, ValueError):  # the disk that failed the run may refuse this too
                pass

    def _warn_error(self, message: str) -> None:
        if self.dist.is_main:
            print(f"error: {message}", file=sys.stderr)

    def write_samples(self) -> None:
        from train.generate import load_tokenizer_for, sample_text

        tok = load_tokenizer_for(self.data.tokenizer_dir)
        if tok is None:
            print("note: no tokenizer known for this data (pass --tokenizer DIR); skipping samples", file=sys.stderr)
            return
        r = self.run
        texts = sample_text(
            unwrap_model(self.raw_model),
            tok,
            r.sample_prompt,
            r.num_samples,
            r.sample_tokens,
            r.temperature,
            r.top_p,
            r.special_token,
            seed=r.seed,
        )
        with open(self.run_dir.path / "samples.txt", "w") as f:
            for i, t in enumerate(texts):
                f.write(f"=== sample {i} (step {self.step}) ===\n{t}\n\n")

    def print_summary(self) -> None:
        if self.dist.is_main and getattr(self, "summary", None) is not None:
            print(closing_summary(self.summary, self.run_dir.path), file=sys.stderr)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        self.run_dir.release()
        self.stopper.uninstall()
        shutdown(self.dist)
