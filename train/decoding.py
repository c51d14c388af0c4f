"""Sampling from a TransformerLM: temperature, top-p (nucleus), a stop token, batched prompts."""

from __future__ import annotations

import torch

from kernels.reference import softmax


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy; top_p keeps the smallest nucleus >= p."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = torch.where(before < top_p, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]] | torch.Tensor,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_token: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt; returns only the new ids of each, cut after ``stop_token`` (included).

    Prompts of different lengths are decoded together: each is left-aligned and its next position is
    read from its own length. Inputs longer than the context are cropped to the last context_length ids.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    ctx = model.config.context_length
    seqs = [list(p) for p in prompts]
    new = [[] for _ in prompts]
    done = [False] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            windows = [seqs[i][-ctx:] for i in active]
            t = max(len(w) for w in windows)
            batch = torch.zeros(len(windows), t, dtype=torch.long)
            for row, w in enumerate(windows):
                batch[row, : len(w)] = torch.tensor(w)
            logits = model(batch.to(device))
            last = torch.tensor([len(w) - 1 for w in windows], device=device)
            step_logits = logits[torch.arange(len(windows), device=device), last]
            next_ids = sample_next(step_logits, temperature, top_p, generator).tolist()
            for i, tok in zip(active, next_ids):
                seqs[i].append(tok)
                new[i].append(tok)
                if stop_token is not None and tok == stop_token:
                    done[i] = True
    finally:
        model.train(was_training)
    return new
