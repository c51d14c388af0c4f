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
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each prompt; returns only the new ids of each, cut after ``stop_token`` (included).

    Prompts are decoded in batches of equal length with a KV cache: the prompt is run once, then
    one token per step. Once a sequence outgrows the context, each step runs on its last
    context_length tokens (cropping), as ``use_cache=False`` does throughout.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    ctx = model.config.context_length
    new: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    was_training = model.training
    model.eval()
    try:
        for idx in groups.values():
            seqs = [list(prompts[i]) for i in idx]
            done = [False] * len(idx)
            cache = model.new_kv_cache(len(idx)) if use_cache else None
            window = torch.tensor([s[-ctx:] for s in seqs], device=device)
            logits = model(window, kv_cache=cache)[:, -1]
            for step in range(max_new_tokens):
                next_ids = sample_next(logits, temperature, top_p, generator)
                for row, tok in enumerate(next_ids.tolist()):
                    seqs[row].append(tok)
                    if not done[row]:
                        new[idx[row]].append(tok)
                        done[row] = stop_token is not None and tok == stop_token
                if all(done) or step == max_new_tokens - 1:
                    break
                if cache is not None and cache[0].length < ctx:
                    logits = model(next_ids[:, None], kv_cache=cache)[:, -1]
                else:
                    cache = None  # past the context: recompute on the cropped window each step
                    logits = model(torch.tensor([s[-ctx:] for s in seqs], device=device))[:, -1]
    finally:
        model.train(was_training)
    return new
