"""Parameter, FLOPs and memory accounting for a ``ModelConfig``.

Two FLOPs conventions, never mixed (every figure the project prints says which it is):

- **Model FLOPs** (what MFU counts, as PaLM and torchtitan do): a matmul of (m x k) by (k x n) costs
  2mnk; elementwise work (norms, RoPE, softmax, SwiGLU's product) is not counted. Attention's QK^T
  and AV are counted dense (4 T^2 d per layer and sequence) even though the mask is causal.
  Training = 3x the forward (the backward computes two matmuls per forward matmul); no recompute.
- **Hardware FLOPs** (what a backend executes; what "achieved TFLOP/s" of a kernel divides): the
  same matmuls, with attention as the backend runs it. Our flash attention (``triton``) skips the
  blocks above the diagonal (counted as half of T^2; the diagonal tiles it computes whole are not
  counted) and its backward recomputes the scores in both of its kernels: dK/dV runs 4 matmuls,
  dQ 3, against the forward's 2, so training attention = 4.5x its forward. The torch reference
  materialises the full T x T scores (masked, not skipped) and saves them: 3x its forward, dense.
  The fused LM-head loss runs its backward matmuls inside the forward, without recompute: the same
  FLOPs in both conventions.

Worked example (``tests/test_conventions.py`` does it by hand): one layer, d = 8, T = 4, d_ff = 16,
V = 10, one sequence: attention projections 2*4*8*32 = 2048, attention matmuls 4*4^2*8 = 512,
SwiGLU 2*4*8*16*3 = 3072, head 2*4*8*10 = 640; forward 6272, training model FLOPs 18816.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig

MODEL_FLOPS = "model FLOPs: matmuls only, attention dense even when causal, training = 3x forward, no recompute"
HARDWARE_FLOPS = (
    "hardware FLOPs: matmuls as executed; triton attention causal half with its backward recomputing the "
    "scores (4.5x forward), torch attention dense (3x forward)"
)


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
    """Forward matmul model FLOPs for ``batch_size`` sequences of ``seq_len`` tokens, by component."""
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
    """Model FLOPs of one training step, per token (3x forward): the numerator of every MFU."""
    t = seq_len or c.context_length
    return 3.0 * forward_flops(c, t, 1) / t


# Executed attention matmuls of a training step over its dense forward count (4 T^2 d), per backend.
_ATTENTION_EXECUTED = {
    "triton": 0.5 * (2 + 4 + 3) / 2,  # causal half; forward 2 matmuls, dK/dV 4, dQ 3 (scores recomputed)
    "torch": 3.0,  # dense scores; backward 2 matmuls per forward matmul
}


def training_hardware_flops_breakdown(
    c: ModelConfig, seq_len: int | None = None, batch_size: int = 1, kernels: str = "triton"
) -> dict[str, float]:
    """Hardware FLOPs of one training step (forward and backward) by component, for the backend
    ``kernels`` ("triton" or "torch"; see the module docstring). Matmuls other than attention's
    are executed as counted (3x forward)."""
    if kernels not in _ATTENTION_EXECUTED:
        raise ValueError(f"unknown kernel backend {kernels!r}; known: {', '.join(_ATTENTION_EXECUTED)}")
    fwd = forward_flops_breakdown(c, seq_len, batch_size)
    out = {k: 3.0 * v for k, v in fwd.items()}
    out["attn_matmul"] = _ATTENTION_EXECUTED[kernels] * fwd["attn_matmul"]
    return out


@dataclass(slots=True)
class MemoryEstimate:
    """Bytes: fp32 parameters, their fp32 gradients, AdamW's fp32 m and v, and the activations the
    backward holds at the end of the forward (``activation_terms``: name -> bytes)."""

    params: int
    grads: int
    optimizer: int
    activation_terms: dict[str, int]

    @property
    def activations(self) -> int:
        return sum(self.activation_terms.values())

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations


def saved_activation_bytes(
    c: ModelConfig,
    batch_size: int,
    seq_len: int | None = None,
    kernels: str = "triton",
    dtype: str = "bf16",
    device_type: str = "cuda",
) -> dict[str, int]:
    """Bytes the backward holds after the forward of ``TransformerLM(c, kernels)`` (fp32 parameters),
    by term: every tensor autograd saves (each storage once, parameters left out) plus what the
    fused loss keeps as attributes (its dx and dweight, computed in the forward).

    ``dtype``: "bf16" (the forward under bf16 autocast, as the trainer and the benchmarks run on a
    GPU) or "fp32". ``device_type`` matters for the torch backend under autocast only: CUDA's
    autocast runs exp and sum in fp32 (the reference softmax's exp-sums), the CPU's does not.
    Covers the presets' architecture (pre-norm RMSNorm, SwiGLU, RoPE).
    ``tests/test_conventions.py`` checks it against the tensors autograd saves.
    """
    if not (c.use_rmsnorm and not c.post_norm and c.use_rope and c.ffn == "swiglu"):
        raise ValueError("the memory estimate covers pre-norm RMSNorm + SwiGLU + RoPE models (every preset)")
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"unknown dtype {dtype!r}; known: bf16, fp32")
    if kernels not in ("triton", "torch"):
        raise ValueError(f"unknown kernel backend {kernels!r}; known: triton, torch")
    t = seq_len or c.context_length
    n = batch_size * t
    d, f, h, v, L = c.d_model, c.d_ff, c.num_heads, c.vocab_size, c.num_layers
    a = 2 if dtype == "bf16" else 4  # matmul inputs and outputs (autocast's dtype)
    cast = a if dtype == "bf16" else 0  # autocast's low-precision copy of a weight (fp32: the parameter itself)
    norms = 2 * L + 1
    terms = {
        "token ids (int64)": 8 * n,
        # the matmuls' inputs, and the weights stacked on the fly (q|k|v, w1|w3) or cast by autocast
        "projection inputs (qkv, w1|w3, w2)": L * (2 * n * d + n * f) * a,
        "stacked and cast weights": L * ((3 * d * d + 2 * d * f) * a + (d * d + f * d) * cast),
    }
    if kernels == "triton":
        terms["norm inputs (fp32 residual stream) and rstd"] = norms * (4 * n * d + 4 * n)
        terms["rope positions (int64)"] = 8 * t
        # q and k after RoPE, the q|k|v projection (v is a view of it), the output
        terms["attention q, k, qkv, o"] = L * 6 * n * d * a
        terms["attention log-sum-exp (fp32, per head)"] = L * 4 * h * n
        terms["swiglu input (gate|up)"] = L * 2 * n * f * a
        terms["fused loss dx and dweight"] = n * d * a + v * d * a
    else:
        terms["norm inputs, normalised x (fp32) and rstd"] = norms * (8 * n * d + 4 * n)
        terms["rope cos and sin (fp32)"] = L * 4 * t * (c.head_dim // 2) * 4
        # q, k, v copied to (B*H, T, D) for the batched matmuls; the output copied back to (B, T, d)
        terms["attention q, k, v, output copies"] = L * 4 * n * d * a
        terms["causal mask (bool)"] = L * t * t
        scores = batch_size * h * t * t
        wide = 4 if dtype == "fp32" or device_type == "cuda" else a  # exp and sum under CUDA autocast: fp32
        terms["attention scores, exp, probabilities"] = L * scores * (2 * a + wide)
        terms["attention row max and sum"] = L * batch_size * h * t * (a + wide)
        terms["swiglu fp32 temporaries"] = L * 16 * n * f
        terms["lm head input and weight cast"] = n * d * a + v * d * cast
        terms["logits and exp (fp32)"] = 2 * n * v * 4
        terms["loss row max, sum, targets, mask"] = n * (4 + 4 + 8 + 1) + 8
    return terms


def training_memory(
    c: ModelConfig,
    batch_size: int,
    seq_len: int | None = None,
    *,
    kernels: str = "triton",
    dtype: str = "bf16",
    device_type: str = "cuda",
) -> MemoryEstimate:
    """Training memory estimate in bytes: fp32 params, grads and AdamW m, v, plus the activations
    held for the backward (``saved_activation_bytes``). Transients (a backward's temporaries, the
    allocator's fragmentation) come on top: compare with a measured peak as a lower bound."""
    n_params = count_parameters(c)["total"]
    return MemoryEstimate(
        params=n_params * 4,
        grads=n_params * 4,
        optimizer=2 * n_params * 4,
        activation_terms=saved_activation_bytes(c, batch_size, seq_len, kernels, dtype, device_type),
    )
