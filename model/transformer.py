"""``TransformerLM``: embeddings, a stack of blocks, the final norm and the LM head."""

from __future__ import annotations

import torch
from torch import nn

from kernels import Ops, get_ops
from model.config import ModelConfig
from model.layers import Embedding, Identity, LayerKVCache, Linear, RMSNorm, TransformerBlock


class TransformerLM(nn.Module):
    """A decoder-only LM. ``kernels`` picks the op backend ("torch" or "triton") once, here.

    The state_dict uses the handout's names (``token_embeddings.weight``, ``layers.{i}.attn.q_proj.weight``,
    ..., ``ln_final.weight``, ``lm_head.weight``) whatever the backend.
    """

    def __init__(self, config: ModelConfig, kernels: str | Ops = "torch", device=None, dtype=None):
        super().__init__()
        self.config = config
        self.ops = get_ops(kernels)
        c = config
        self.token_embeddings = Embedding(c.vocab_size, c.d_model, device, dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.d_model,
                c.num_heads,
                c.d_ff,
                c.context_length,
                c.rope_theta if c.use_rope else None,
                device,
                dtype,
                use_rmsnorm=c.use_rmsnorm,
                post_norm=c.post_norm,
                ffn=c.ffn,
                eps=c.norm_eps,
                ops=self.ops,
            )
            for _ in range(c.num_layers)
        )
        # Post-norm blocks already end in a norm; a final one is kept for pre-norm only (as in the handout).
        self.ln_final = (
            RMSNorm(c.d_model, c.norm_eps, device, dtype, ops=self.ops, feeds_matmul=True)
            if c.use_rmsnorm and not c.post_norm
            else Identity()
        )
        self.lm_head = Linear(c.d_model, c.vocab_size, device, dtype)

    @property
    def kernels(self) -> str:
        return self.ops.name

    def _check_tokens(self, token_ids: torch.Tensor) -> None:
        if token_ids.dim() < 1:
            raise ValueError("token_ids must have a sequence dimension")
        t = token_ids.shape[-1]
        if t > self.config.context_length:
            raise ValueError(f"sequence length {t} exceeds the model's context_length {self.config.context_length}")
        if token_ids.dtype.is_floating_point:
            raise TypeError(f"token_ids must be integers, got {token_ids.dtype}")
        if token_ids.numel() == 0:
            return
        v = self.config.vocab_size
        if token_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= v:
                raise ValueError(f"token ids must lie in [0, {v}); got values in [{lo}, {hi}]")
        else:
            # No host sync in the training step (and no graph break under torch.compile): the
            # check runs on the device and fails the stream.
            torch._assert_async(((token_ids >= 0) & (token_ids < v)).all(), f"token id out of range [0, {v})")

    def hidden_states(
        self, token_ids: torch.Tensor, token_positions: torch.Tensor | None = None, kv_cache: list | None = None
    ) -> torch.Tensor:
        """Final normalised hidden states (..., T, d_model), before the LM head."""
        self._check_tokens(token_ids)
        if kv_cache is not None and kv_cache[0].length + token_ids.shape[-1] > self.config.context_length:
            raise ValueError(
                f"{kv_cache[0].length} cached + {token_ids.shape[-1]} new tokens exceed "
                f"context_length {self.config.context_length}"
            )
        x = self.token_embeddings(token_ids)
        if token_positions is None and self.config.use_rope:
            # One positions tensor for every layer (each would otherwise build its own).
            start = kv_cache[0].length if kv_cache is not None else 0
            token_positions = torch.arange(start, start + token_ids.shape[-1], device=token_ids.device)
        # Pre-norm: each block's last residual add is done by the next norm (fused on triton);
        # post-norm blocks defer nothing (pending stays None).
        pending = None
        for i, layer in enumerate(self.layers):
            x, pending = layer(x, token_positions, kv_cache[i] if kv_cache is not None else None, pending=pending)
        if pending is None:
            return self.ln_final(x)
        return self.ln_final.add_and_norm(x, pending)[1]

    def forward(
        self,
        token_ids: torch.Tensor,
        token_positions: torch.Tensor | None = None,
        *,
        targets: torch.Tensor | None = None,
        kv_cache: list | None = None,
    ) -> torch.Tensor:
        """token_ids (..., T) -> logits (..., T, vocab_size); with ``targets``, the mean loss instead.

        The loss path goes through ``forward`` so that DDP and torch.compile wrappers see it. With a
        ``kv_cache`` (from ``new_kv_cache``) the tokens continue the cached sequence (decoding).
        """
        if targets is not None:
            return self.loss(token_ids, targets)
        return self.lm_head(self.hidden_states(token_ids, token_positions, kv_cache))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> list:
        """Empty per-layer key/value caches for incremental decoding of ``batch_size`` sequences."""
        c = self.config
        p = self.lm_head.weight
        return [
            LayerKVCache(batch_size, max_len or c.context_length, c.num_heads, c.head_dim, p.device, p.dtype)
            for _ in range(c.num_layers)
        ]

    def loss(self, token_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; the triton backend never builds the logits."""
        if targets.shape != token_ids.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match token_ids {tuple(token_ids.shape)}")
        h = self.hidden_states(token_ids)
        w = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            # The fused head bypasses autocast's matmul hook, so cast as autocast would.
            dt = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dt), w.to(dt)
        return self.ops.linear_cross_entropy(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.token_embeddings.weight.numel()
        return n
