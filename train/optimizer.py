"""From-scratch AdamW, the cosine learning-rate schedule and global gradient-norm clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as in the handout's Algorithm 2.

    State per parameter: ``step``, ``exp_avg`` (m), ``exp_avg_sq`` (v), kept in fp32 whatever the
    parameter dtype.

    ``fused=True`` runs each step as one Triton kernel over all parameters (``kernels.adamw``: one
    read of p, g, m, v and one write of p, m, v, where the foreach passes below make about 18
    accesses an element); the same arithmetic. It needs CUDA tensors (or Triton's interpreter) and
    falls back to the foreach passes for tensors it cannot address directly (FSDP2's DTensor
    shards, non-contiguous ones).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        fused: bool = False,
    ):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.fused = fused
        self._tables = None
        if fused:
            from kernels._utils import interpreting
            from kernels.adamw import LaunchTables

            off_gpu = [p.device for g in self.param_groups for p in g["params"] if p.device.type != "cuda"]
            if off_gpu and not interpreting():
                raise ValueError(
                    f"fused=True runs a Triton kernel on CUDA tensors; got parameters on {off_gpu[0]} (use fused=False)"
                )
            self._tables = LaunchTables()

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None):
        """One update. ``grad_scale`` (a 0-d device tensor, e.g. the clip factor from
        ``grad_norm_and_clip_scale``) multiplies every gradient first: in place in ``p.grad`` on the
        foreach path, as the kernel reads it on the fused one (``p.grad`` is left as it was)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            params, grads, ms, vs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            if self.fused and self._fused_step(group, params, grads, ms, vs, steps, grad_scale):
                continue
            if grad_scale is not None:  # in place, as clip_grad_norm would have
                torch._foreach_mul_(grads, grad_scale.to(grads[0].dtype))
            grads = [g.float() if g.dtype != torch.float32 else g for g in grads]
            # Foreach (multi-tensor) updates: a handful of kernel launches per group instead of
            # several per parameter, the same arithmetic as the per-tensor loop:
            #   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
            #   theta <- theta (1 - lr wd) - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
            torch._foreach_lerp_(ms, grads, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
            steps_alpha = [-lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) for t in steps]
            denoms = torch._foreach_sqrt(vs)
            torch._foreach_add_(denoms, eps)
            fp32 = [i for i, p in enumerate(params) if p.dtype == torch.float32]
            if len(fp32) == len(params):
                if wd:
                    torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_addcdiv_(params, ms, denoms, steps_alpha)
            else:  # low-precision parameters: update an fp32 copy, then round once
                for p, m, d, a in zip(params, ms, denoms, steps_alpha):
                    p32 = p.float()
                    if wd:
                        p32.mul_(1 - lr * wd)
                    p.copy_(p32.addcdiv_(m, d, value=a))
        return loss

    def load_state_dict(self, state_dict) -> None:
        # torch's loader casts floating-point state to each parameter's dtype; the moments are
        # fp32 here whatever the parameter (a bf16 parameter's m and v in bf16 would lose the small
        # updates), so they are put back as saved.
        moments = {i: {k: s[k] for k in ("exp_avg", "exp_avg_sq") if k in s} for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            for k, v in moments.get(i, {}).items():
                self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)

    def _fused_step(self, group, params, grads, ms, vs, steps, grad_scale) -> bool:
        """The group's update by the fused kernel, one launch per step count present (one, unless
        parameters joined at different steps); False (nothing done) if it cannot take them."""
        from kernels.adamw import adamw_step_, supports

        if not supports([*params, *grads, *ms, *vs]):
            return False
        (beta1, beta2) = group["betas"]
        by_step: dict[int, list[int]] = {}
        for i, t in enumerate(steps):
            by_step.setdefault(t, []).append(i)
        for t, idx in by_step.items():
            adamw_step_(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [ms[i] for i in idx],
                [vs[i] for i in idx],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step=t,
                tables=self._tables,
                grad_scale=grad_scale,
            )
        return True


def get_lr_cosine_schedule(
    it: int,
    max_learning_rate: float,
    min_learning_rate: float,
    warmup_iters: int,
    cosine_cycle_iters: int,
) -> float:
    """Linear warmup to max over ``warmup_iters``, cosine decay to min at ``cosine_cycle_iters``, then min."""
    if it < warmup_iters:
        return it / warmup_iters * max_learning_rate
    if it <= cosine_cycle_iters:
        progress = (it - warmup_iters) / max(1, cosine_cycle_iters - warmup_iters)
        return min_learning_rate + 0.5 * (1 + math.cos(math.pi * progress)) * (max_learning_rate - min_learning_rate)
    return min_learning_rate


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_l2_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale all gradients in place so their combined L2 norm is at most ``max_l2_norm``.

    Returns the norm before clipping as a 0-d tensor (no host sync: the scale is applied on device).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total, scale = grad_norm_and_clip_scale(grads, max_l2_norm, eps)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total


def clip_and_step(optimizer: AdamW, max_l2_norm: float) -> torch.Tensor | None:
    """An optimizer step with its gradients clipped to a global L2 norm of ``max_l2_norm`` (0: no
    clipping), the factor applied inside the update; returns the norm before clipping (or None)."""
    if max_l2_norm <= 0:
        optimizer.step()
        return None
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    norm, factor = grad_norm_and_clip_scale(grads, max_l2_norm)
    optimizer.step(grad_scale=factor)
    return norm


@torch.no_grad()
def grad_norm_and_clip_scale(
    grads: list[torch.Tensor], max_l2_norm: float, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(combined L2 norm of ``grads``, min(1, max_l2_norm / (norm + eps))) as 0-d device tensors,
    the gradients untouched: ``AdamW.step(grad_scale=...)`` applies the clip inside its update
    (the fused kernel multiplies as it reads g: no separate pass over the gradients)."""
    if not grads:
        return torch.zeros(()), torch.ones(())
    norms = torch._foreach_norm(grads, 2.0)
    if hasattr(norms[0], "full_tensor"):  # sharded (FSDP2 DTensor) grads: reduce across shards
        total = sum(n.float() ** 2 for n in norms).full_tensor().sqrt()
    else:
        # One stack and one norm: not a power, a cast and an add per parameter (three launches
        # each, 100+ a step at TinyStories' 39 parameters, for a few bytes of work).
        total = torch.linalg.vector_norm(torch.stack(norms).float())
    return total, torch.clamp(max_l2_norm / (total + eps), max=1.0)
