"""Parameter, FLOPs and memory accounting for a ``ModelConfig``.

Conventions (stated, since every MFU figure depends on them):
- A matmul of (m x k) by (k x n) costs 2mnk FLOPs. Elementwise work (norms, RoPE, softmax, SwiGLU's
  product) is not counted: it is bandwidth, reported separately by the benchmarks.
- Attention's QK^T and AV are counted dense (4 T^2 d per layer and sequence), causal or not, as
  PaLM and torchtitan do.
- Training = forward + backward = 3x the forward (the backward computes two matmuls per forward
  matmul); no activation recompute is counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig


def count_parameters(c: ModelConfig) -> dict[str, int]:
    d, v, L = c.d_model, c.vocab_size, c.num_layers
    ffn_mats = 3 if c.ffn == "swiglu" else 2
    norms_per_layer = 2 * d if c.use_rmsnorm else 0
    final_norm = d if c.use_rmsnorm and not c.post_norm else 0
    per_layer = 4 * d * d + ffn_mats * d * c.d_ff + norms_per_layer
    return {
        "embedding": v * d,
        "layers": L * per_layer,
        "final_norm": final_norm,
        "lm_head": v * d,
        "total": v * d + L * per_layer + final_norm + v * d,
    }


def forward_flops_breakdown(c: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> dict[str, float]:
    """Forward matmul FLOPs for ``batch_size`` sequences of ``seq_len`` tokens, by component."""
    t = seq_len or c.context_length
    n = batch_size * t
    d, L = c.d_model, c.num_layers
    ffn_mats = 3 if c.ffn == "swiglu" else 2
    return {
        "attn_proj": float(L * 2 * n * d * (4 * d)),
        "attn_matmul": float(L * batch_size * 4 * t * t * d),
        "ffn": float(L * 2 * n * d * c.d_ff * ffn_mats),
        "lm_head": float(2 * n * d * c.vocab_size),
    }


def forward_flops(c: ModelConfig, seq_len: int | None = None, batch_size: int = 1) -> float:
    return sum(forward_flops_breakdown(c, seq_len, batch_size).values())


def training_flops_per_token(c: ModelConfig, seq_len: int | None = None) -> float:
    """Model FLOPs of one training step, per token (3x forward)."""
    t = seq_len or c.context_length
    return 3.0 * forward_flops(c, t, 1) / t


@dataclass(slots=True)
class MemoryEstimate:
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def training_memory(
    c: ModelConfig,
    batch_size: int,
    seq_len: int | None = None,
    param_bytes: int = 4,
    act_bytes: int = 2,
    fused_loss: bool = False,
    flash_attention: bool = False,
) -> MemoryEstimate:
    """Peak training memory estimate in bytes: fp32 params, grads and AdamW m, v; activations saved
    for the backward (``act_bytes`` each: 2 under bf16 autocast).

    Per layer and token the backward keeps about: the block input and its normed copy twice (4d),
    q, k, v and the attention output (4d), the FFN's two inputs and product (3 d_ff) plus its input
    (d); the attention probabilities (H T per token) unless flash attention keeps only the
    log-sum-exp. The LM head keeps its logits and their fp32 softmax (V * (act_bytes + 4) per token)
    unless the fused loss never builds them.
    """
    t = seq_len or c.context_length
    n_params = count_parameters(c)["total"]
    n = batch_size * t
    per_layer_token = (4 * c.d_model + 4 * c.d_model + 3 * c.d_ff + c.d_model) * act_bytes
    attn = 4 if flash_attention else c.num_heads * t * act_bytes
    per_token = c.num_layers * (per_layer_token + attn) + c.d_model * 4
    head = 0 if fused_loss else c.vocab_size * (act_bytes + 4)
    return MemoryEstimate(
        params=n_params * param_bytes,
        grads=n_params * param_bytes,
        optimizer=2 * n_params * 4,
        activations=n * (per_token + head),
    )
