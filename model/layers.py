"""From-scratch layers of the Transformer LM (no torch.nn layers, no torch.nn.functional).

Every layer that has a fused kernel takes an ``ops`` namespace (see ``kernels.get_ops``) and reaches
its hot op only through it; the default is the torch reference backend.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels import Ops, get_ops, reference


def _ops(ops: Ops | str | None) -> Ops:
    return get_ops("torch" if ops is None else ops)


class Linear(nn.Module):
    """y = x W^T, W: (out_features, in_features), no bias; truncated-normal init as in the handout."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        std = math.sqrt(2.0 / (in_features + out_features))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Embedding(nn.Module):
    """Lookup of rows of a (num_embeddings, embedding_dim) table; N(0, 1) truncated at +-3."""

    def __init__(self, num_embeddings: int, embedding_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        nn.init.trunc_normal_(self.weight, mean=0.0, std=1.0, a=-3.0, b=3.0)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.weight[token_ids]


class RMSNorm(nn.Module):
    """x / rms(x) * g over the last dim; computed in fp32, returned in the input dtype.

    ``feeds_matmul``: the output goes only into matmuls (a pre-norm block's norms, the final norm).
    Under autocast it is then returned in the autocast dtype, cast once here, where each matmul
    reading it would otherwise cast it again (q, k and v: three casts of the same activation, and
    three fp32 gradients summed in the backward). The values the matmuls see are the same.
    """

    def __init__(
        self,
        d_model: int,
        eps: float = 1e-5,
        device=None,
        dtype=None,
        *,
        ops: Ops | str | None = None,
        feeds_matmul: bool = False,
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        self.ops = _ops(ops)
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps, self._out_dtype(x))

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype | None:
        if self.feeds_matmul and torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return None

    def add_and_norm(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, self(h)) with h = x + r: the residual add before this norm, fused with it on triton."""
        return self.ops.add_rms_norm(x, r, self.weight, self.eps, self._out_dtype(x))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None, *, ops: Ops | str | None = None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)
        self.w3 = Linear(d_model, d_ff, device, dtype)
        self.ops = _ops(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # w1 and w3 as one matmul (x read once, one input gradient), weights stacked on the fly;
        # the activation reads the two halves and writes its gradient as one tensor.
        w = torch.cat([self.w1.weight, self.w3.weight])
        return self.w2(self.ops.swiglu_packed(torch.matmul(x, w.t())))


class SiLUFeedForward(nn.Module):
    """Ablation: w2(silu(w1 x)), conventionally with d_ff = 4 d_model."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, device, dtype)
        self.w2 = Linear(d_ff, d_model, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        return self.w2(h * torch.sigmoid(h))


class RotaryPositionalEmbedding(nn.Module):
    """RoPE on adjacent pairs (2i, 2i+1) of the last dim; angles p * theta^(-2i/d_k).

    ``forward(x (..., T, d_k), token_positions)`` with integer positions broadcastable to
    ``x.shape[:-1]``. Holds no parameters (nothing in the state_dict).
    """

    def __init__(self, theta: float, d_k: int, max_seq_len: int, device=None, *, ops: Ops | str | None = None):
        # max_seq_len and device are the handout's signature: angles are computed per call from
        # the positions, so no table is sized or placed.
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RoPE needs an even d_k, got {d_k}")
        self.theta, self.d_k = float(theta), d_k
        self.ops = _ops(ops)

    def forward(self, x: torch.Tensor, token_positions: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_k:
            raise ValueError(f"RoPE built for d_k={self.d_k}, got last dim {x.shape[-1]}")
        return self.ops.rope(x, token_positions, self.theta)

    def forward_qk(self, q: torch.Tensor, k: torch.Tensor, token_positions: torch.Tensor):
        return self.ops.rope_qk(q, k, token_positions, self.theta)


class MultiHeadSelfAttention(nn.Module):
    """Causal multi-head self-attention; RoPE on q and k when ``theta`` is given."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        max_seq_len: int | None = None,
        theta: float | None = None,
        device=None,
        dtype=None,
        *,
        ops: Ops | str | None = None,
    ):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        self.q_proj = Linear(d_model, d_model, device, dtype)
        self.k_proj = Linear(d_model, d_model, device, dtype)
        self.v_proj = Linear(d_model, d_model, device, dtype)
        self.output_proj = Linear(d_model, d_model, device, dtype)
        self.ops = _ops(ops)
        self.rope = None
        if theta is not None:
            self.rope = RotaryPositionalEmbedding(theta, self.head_dim, max_seq_len or 0, device, ops=self.ops)

    def forward(
        self, x: torch.Tensor, token_positions: torch.Tensor | None = None, kv_cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        """x (..., T, d_model). With ``kv_cache`` the T tokens continue the cached sequence: their
        positions follow it, their keys and values are appended to it, and they attend to all of it."""
        *lead, t, d = x.shape
        x3 = x.reshape(-1, t, d)
        b = x3.shape[0]
        # One matmul for q, k and v (x read once, one larger GEMM, one input gradient instead of
        # three summed), from the three weights concatenated on the fly: the state_dict keeps the
        # handout's separate keys. (B, T, H, D) views of it: RoPE reads them in place (rows of
        # heads, positions broadcast over heads) and attention through strides: no copies.
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qkv = torch.matmul(x3, w.t()).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        start = kv_cache.length if kv_cache is not None else 0
        if self.rope is not None:
            if token_positions is None:
                token_positions = torch.arange(start, start + t, device=x.device)
            pos = token_positions.reshape(-1, t) if token_positions.dim() > 1 else token_positions
            q, k = self.rope.forward_qk(q, k, pos.unsqueeze(-1))
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        if k.shape[1] == t:
            out = self.ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        else:
            # Decoding: a few new queries against a longer cached sequence. The fused kernel takes
            # equal lengths only; the reference handles the offset causal mask (and this is tiny work).
            out = reference.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.output_proj(out).reshape(*lead, t, d)


class LayerKVCache:
    """Keys and values of one attention layer for the tokens seen so far: (B, max_len, H, D) buffers."""

    def __init__(self, batch_size: int, max_len: int, num_heads: int, head_dim: int, device=None, dtype=None):
        self.k = torch.empty(batch_size, max_len, num_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[1]
        if self.length + t > self.k.shape[1]:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens exceed its {self.k.shape[1]}")
        self.k[:, self.length : self.length + t] = k
        self.v[:, self.length : self.length + t] = v
        self.length += t
        return self.k[:, : self.length], self.v[:, : self.length]


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add_and_norm(self, x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + r
        return h, h


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + ffn(ln2(.)); ablations switch norm and FFN kinds.
    Each residual add runs fused with the norm that follows it (see ``forward``)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        max_seq_len: int,
        theta: float | None,
        device=None,
        dtype=None,
        *,
        use_rmsnorm: bool = True,
        post_norm: bool = False,
        ffn: str = "swiglu",
        eps: float = 1e-5,
        ops: Ops | str | None = None,
    ):
        super().__init__()
        ops = _ops(ops)
        self.post_norm = post_norm

        def norm() -> nn.Module:
            # pre-norm: the norms' outputs feed only the projections; post-norm: they are the residual stream
            return (
                RMSNorm(d_model, eps, device, dtype, ops=ops, feeds_matmul=not post_norm) if use_rmsnorm else Identity()
            )

        self.ln1 = norm()
        self.attn = MultiHeadSelfAttention(d_model, num_heads, max_seq_len, theta, device, dtype, ops=ops)
        self.ln2 = norm()
        if ffn == "swiglu":
            self.ffn = SwiGLU(d_model, d_ff, device, dtype, ops=ops)
        elif ffn == "silu":
            self.ffn = SiLUFeedForward(d_model, d_ff, device, dtype)
        else:
            raise ValueError(f"unknown ffn kind {ffn!r}; known: swiglu, silu")

    def forward(
        self,
        x: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        kv_cache: LayerKVCache | None = None,
        *,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(h, f) for input x (plus ``pending``, when given): the block's output is h + f
        (``block_output``). A pre-norm block leaves that last residual add to the norm that reads
        the sum (``add_and_norm``, one pass on triton): the model hands f to the next block as
        ``pending`` (its ln1 adds it) or to the final norm. A post-norm block ends in its norm and
        returns (output, None). Through ``forward``, not a method beside it, so that wrappers'
        hooks (FSDP2's all-gathers) run."""
        if self.post_norm:
            if pending is not None:
                raise ValueError("a post-norm block ends in its norm: it takes no pending residual add")
            x = self.ln1(x + self.attn(x, token_positions, kv_cache))
            return self.ln2(x + self.ffn(x)), None
        if pending is None:
            normed = self.ln1(x)
        else:
            x, normed = self.ln1.add_and_norm(x, pending)
        x, normed = self.ln2.add_and_norm(x, self.attn(normed, token_positions, kv_cache))
        return x, self.ffn(normed)


def block_output(pair: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """A block's output from its (h, f): h + f, or h when nothing was deferred."""
    h, f = pair
    return h if f is None else h + f
