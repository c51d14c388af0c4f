"""The from-scratch Transformer LM: layers, functions, config and the model."""

from kernels.reference import cross_entropy, scaled_dot_product_attention, silu, softmax
from model.config import ModelConfig
from model.layers import (
    Embedding,
    Linear,
    MultiHeadSelfAttention,
    RMSNorm,
    RotaryPositionalEmbedding,
    SiLUFeedForward,
    SwiGLU,
    TransformerBlock,
    block_output,
)
from model.transformer import TransformerLM

__all__ = [
    "Embedding",
    "Linear",
    "ModelConfig",
    "MultiHeadSelfAttention",
    "RMSNorm",
    "RotaryPositionalEmbedding",
    "SiLUFeedForward",
    "SwiGLU",
    "TransformerBlock",
    "TransformerLM",
    "block_output",
    "cross_entropy",
    "scaled_dot_product_attention",
    "silu",
    "softmax",
]
