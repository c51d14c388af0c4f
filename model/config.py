"""``ModelConfig``: the shape of a Transformer LM and the handout's ablations."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FFN_KINDS = ("swiglu", "silu")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    vocab_size: int = 10_000
    """Number of token ids the embedding and LM head cover."""
    context_length: int = 256
    """Longest sequence the model accepts (and the RoPE table covers)."""
    d_model: int = 512
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of Transformer blocks."""
    num_heads: int = 16
    """Attention heads per block; d_model must be divisible by it."""
    d_ff: int = 1344
    """Hidden width of the feed-forward (SwiGLU: about 8/3 d_model; SiLU FFN: 4 d_model)."""
    rope_theta: float = 10_000.0
    """RoPE base; ignored when use_rope is False (NoPE)."""
    use_rmsnorm: bool = True
    """Ablation: False removes every RMSNorm (the blocks and the final norm)."""
    post_norm: bool = False
    """Ablation: True applies the norm after each residual add instead of before each sub-layer."""
    use_rope: bool = True
    """Ablation: False is NoPE, no position information at all."""
    ffn: str = "swiglu"
    """Feed-forward kind: "swiglu" (W2 (silu(W1 x) * W3 x)) or "silu" (W2 silu(W1 x))."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension; d_model / num_heads = {self.head_dim}")
        if self.use_rope and not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)
