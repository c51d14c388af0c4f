"""Checkpoints: model, optimizer, iteration (and any extra state), written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, BinaryIO

import torch
from torch import nn


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
    """
    model = unwrap_model(model)
    state = {
        "model": model_state if model_state is not None else model.state_dict(),
        "optimizer": optimizer_state
        if optimizer_state is not None
        else (optimizer.state_dict() if optimizer is not None else None),
        "iteration": int(iteration),
        **extra,
    }
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        state.setdefault("model_config", config.to_dict())
    if isinstance(out, (str, os.PathLike)):
        path = Path(out)
        if path.parent and not path.parent.exists():
            raise FileNotFoundError(f"checkpoint directory does not exist: {path.parent}")
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        torch.save(state, out)


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
    if isinstance(src, (str, os.PathLike)) and not Path(src).exists():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    return torch.load(src, map_location=map_location, weights_only=False)


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
