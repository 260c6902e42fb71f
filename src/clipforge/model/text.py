"""The text tower: token + position embeddings, a causal pre-LN transformer, pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import TextConfig
from clipforge.model.layers import Transformer, resample_sequence_pos_embed


class TextTransformer(nn.Module):
    """Token ids [B, L] -> embeddings [B, embed_dim].

    Pools at each row's end-of-text token, found as the row's largest id (the end token is the last entry of
    CLIP's vocabulary; this is exactly OpenAI's rule). Under the causal mask that position never sees the
    padding after it, so the batch is cut to its longest text before the transformer: the result is the same
    and padding costs nothing.
    """

    def __init__(self, config: TextConfig, embed_dim: int, activation: str) -> None:
        super().__init__()
        self.context_length = config.context_length
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.pos_embed = nn.Parameter(torch.empty(config.context_length, config.width))
        self.transformer = Transformer(
            config.width, config.layers, config.heads, config.mlp_ratio, activation
        )
        self.norm_final = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        nn.init.normal_(self.proj.weight, std=self.transformer.width**-0.5)
        self.transformer.init_weights()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids of shape [batch, length], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds the model's context length {self.context_length}; "
                "tokenize with clipforge.get_tokenizer(model) or call model.resize_context(length)"
            )
        pool_index = tokens.argmax(dim=-1)  # [B]
        length = int(pool_index.max()) + 1 if tokens.shape[0] else 1
        x = self.token_embed(tokens[:, :length]) + self.pos_embed[:length]
        x = self.norm_final(self.transformer(x, causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), pool_index]
        return self.proj(pooled)

    @torch.no_grad()
    def resize_context(self, context_length: int) -> None:
        """Truncate (or linearly stretch) the position embedding to ``context_length`` tokens."""
        self.pos_embed = nn.Parameter(resample_sequence_pos_embed(self.pos_embed.data, context_length))
        self.context_length = context_length
