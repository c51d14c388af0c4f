"""Checkpoints: model, optimizer, iteration (and any extra state), written atomically.

A checkpoint file is complete or absent: it is written to a temporary file, fsynced and renamed.
A run only writes a state that is finite (``all_finite``, one fused reduction on the device), and
resumes from the newest checkpoint that loads and passes ``validate_checkpoint``; damaged ones are
reported by path and skipped (``find_resumable``).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO

import torch
from torch import nn

from train.errors import UserError

# 1: no version field (before faults were handled); 2: adds format_version, loss accumulators.
FORMAT_VERSION = 2
CHECKPOINT_NAME = re.compile(r"^step_(\d+)\.pt$")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: str | os.PathLike | BinaryIO | IO[bytes],
    *,
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
    **extra: Any,
) -> None:
    """Save model and optimizer state and the iteration; a path is written via a temporary file and rename.

    ``model_state``/``optimizer_state`` replace ``model.state_dict()``/``optimizer.state_dict()``
    (sharded runs pass the full state dicts gathered from every rank); ``extra`` keys are stored too.
    A full disk is a ``UserError`` naming the file, found before anything is written where the
    free space is visibly too small, and never leaves a partial file behind.
    """
    model = unwrap_model(model)
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    state = {
        "format_version": FORMAT_VERSION,
        "model": model_state if model_state is not None else model.state_dict(),
        "optimizer": optimizer_state,
        "iteration": int(iteration),
        **extra,
    }
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        state.setdefault("model_config", config.to_dict())
    if not isinstance(out, (str, os.PathLike)):
        torch.save(state, out)
        return
    path = Path(out)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"checkpoint directory does not exist: {path.parent}")
    need = sum(t.numel() * t.element_size() for t in _tensors(state))
    if shutil.disk_usage(path.parent).free < need:
        raise _disk_full(path, need)
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc] unexpected pos".
        if isinstance(e, (OSError, RuntimeError)) and (
            getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(path.parent).free < need
        ):
            raise _disk_full(path, need) from None
        raise


def _disk_full(path: Path, need: int) -> UserError:
    free = shutil.disk_usage(path.parent).free
    return UserError(
        f"cannot write checkpoint {path}: no space left on device ({free / 2**20:.1f} MiB free, "
        f"the checkpoint needs {need / 2**20:.1f} MiB); free space or move --out-dir, then rerun to resume"
    )


def _tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor in a nested structure of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def all_finite(*states: Any) -> bool:
    """True when every floating-point tensor in ``states`` (state dicts, optimizer state, single
    tensors such as the last grad norm) is finite.

    One fused reduction per device: ``torch._foreach_norm(..., inf)`` gives each tensor's largest
    magnitude (inf or nan when the tensor holds one, and no overflow, unlike a 2-norm), and a single
    value per device comes back to the host."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in _tensors(states):
        if t.is_floating_point() and t.numel():
            groups[(t.device, t.dtype)].append(t.detach())
    per_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for (device, _), ts in groups.items():
        per_device[device] += [n.float() for n in torch._foreach_norm(ts, float("inf"))]
    return all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in per_device.values())


def validate_checkpoint(state: Any) -> None:
    """Raise ValueError saying what is wrong with a loaded checkpoint: not ours, a newer format,
    missing parts, or non-finite tensors."""
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise ValueError("not a checkpoint of this project (no model state or iteration)")
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {version} is newer than this code reads ({FORMAT_VERSION})")
    if not all_finite(state["model"], state.get("optimizer")):
        raise ValueError("it holds non-finite parameters or optimizer moments")


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in a directory, oldest first; other files are ignored."""
    found = []
    for p in Path(directory).glob("step_*.pt"):
        m = CHECKPOINT_NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(directory: str | os.PathLike, keep: int, upto_step: int | None = None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (by step) up to ``upto_step``; nothing after
    that step is ever deleted. Returns what was deleted."""
    found = [(s, p) for s, p in list_checkpoints(directory) if upto_step is None or s <= upto_step]
    old = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in old:
        p.unlink(missing_ok=True)
    return old


def find_resumable(directory: str | os.PathLike, warn) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``directory`` that loads and validates, with its state (on the CPU).

    Each damaged one (truncated, empty, garbage, non-finite, unknown format) is passed to
    ``warn(message)`` with its path and renamed to ``*.pt.damaged`` (kept for a look, out of the
    way of resuming and pruning). None when the directory has no checkpoint; a UserError when it
    has some and none is usable."""
    found = list_checkpoints(directory)
    bad = []
    for _, path in reversed(found):
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            validate_checkpoint(state)
        except Exception as e:  # any way a file can be damaged: zip, pickle, EOF, our checks
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            aside = path.with_name(path.name + ".damaged")
            warn(f"skipping damaged checkpoint {path} (renamed to {aside.name}): {reason}")
            os.replace(path, aside)
            bad.append(aside)
            continue
        return path, state
    if bad:
        raise UserError(
            f"no usable checkpoint in {directory}: all {len(bad)} are damaged (renamed to *.pt.damaged); "
            "rerun to start over, or pass --resume PATH"
        )
    return None


def check_compatible(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming missing, unexpected and mis-shaped keys of a saved state dict."""
    own = model.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in saved and tuple(saved[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        lines = ["checkpoint does not match this model's configuration:"]
        if missing:
            lines.append(
                f"  missing keys ({len(missing)}): {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
        if unexpected:
            more = " ..." if len(unexpected) > 10 else ""
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}{more}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}):")
            lines.extend(f"    {m}" for m in mismatched[:10])
        raise ValueError("\n".join(lines))


def load_checkpoint_state(src: str | os.PathLike | BinaryIO | IO[bytes], map_location="cpu") -> dict:
    """A checkpoint's state; a missing, damaged or non-finite file is a UserError naming it."""
    if isinstance(src, (str, os.PathLike)) and not Path(src).exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    try:
        state = torch.load(src, map_location=map_location, weights_only=False)
        validate_checkpoint(state)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot use checkpoint {src}: {reason}") from None
    return state


def load_checkpoint(
    src: str | os.PathLike | BinaryIO | IO[bytes],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Restore model (and optimizer) state from ``src``; returns the saved iteration."""
    state = load_checkpoint_state(src)
    model = unwrap_model(model)
    check_compatible(model, state["model"])
    model.load_state_dict(state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    return int(state["iteration"])


# --- sharded (FSDP2) runs ----------------------------------------------------------------------
# With FSDP2 every rank holds a shard of each parameter (a DTensor). Checkpoints always hold full,
# unsharded tensors on the CPU, so any run can resume them, sharded or not, on any number of GPUs.
# The optimizer state is then keyed by parameter name ("fqn" format) instead of by index.


def gather_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict, str]:
    """Full model and optimizer state dicts. Collective when ``sharded``: every rank must call it."""
    if not sharded:
        return unwrap_model(model).state_dict(), optimizer.state_dict(), "index"
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts), "fqn"


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fmt: str, sharded: bool
) -> None:
    """Restore optimizer state saved in either format into a sharded or plain model's optimizer."""
    if fmt == "index" and not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if fmt == "index":  # index -> parameter name, in the order the optimizer was built
        names = [n for n, _ in unwrap_model(model).named_parameters()]
        state = {
            "state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
