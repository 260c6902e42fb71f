"""The text tower: token + position embeddings, a causal pre-LN transformer, pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import TextConfig
from clipforge.model.layers import Packing, Transformer, resample_sequence_pos_embed, use_fast_paths

# Attention runs on groups of texts of similar length (see Packing); a group's fixed cost, in padded tokens. On
# the CPU a group costs a few kernel launches (thread-pool wake-ups: milliseconds on a busy machine), a padded
# token ~3·width bytes and ~4·L·width FLOPs: ~3 groups for 256 short captions. On a GPU launches dominate.
ATTENTION_GROUP_COST = {"cpu": 1024}
ATTENTION_GROUP_COST_OTHER = 16384  # GPUs


class TextTransformer(nn.Module):
    """Token ids [B, L] -> embeddings [B, embed_dim].

    Pools at each row's end-of-text token, found as the row's largest id (the end token is the last entry of
    CLIP's vocabulary; this is exactly OpenAI's rule). Under the causal mask that position never sees what
    follows it, so padding is not computed: in training the batch is cut to its longest text; in inference
    (eval mode, no autograd) the tokens run packed (:class:`Packing`: position-wise layers see only real
    tokens, attention pads groups of similar length) and the last block, final norm and projection run on
    the end token only. Either way the result is the padded computation's.
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
        if tokens.shape[0] == 0:
            return self.proj(self.norm_final(self.token_embed(tokens.new_zeros(0))))
        lengths = tokens.argmax(dim=-1) + 1  # [B]: up to and including the end token
        if use_fast_paths(self):
            return self.proj(self.norm_final(self._pooled_packed(tokens, lengths)))
        length = int(lengths.max())  # the reference: the batch cut to its longest text (a host sync)
        return self.forward_static(tokens[:, :length])

    def forward_static(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] (L ≤ context length) -> [B, embed_dim] with no data-dependent shape: every position
        through the causal transformer, pooled at each row's end token. The reference computation without its
        cut to the longest text (:meth:`forward` calls this on the cut batch), so the same values: under the
        causal mask the end token never sees the padding after it. The graph ONNX export traces."""
        ends = tokens.argmax(dim=-1)  # [B]: the end token's position
        x = self.transformer(self.token_embed(tokens) + self.pos_embed[: tokens.shape[1]], causal=True)
        pooled = x[torch.arange(x.shape[0], device=x.device), ends]  # the end token's output
        return self.proj(self.norm_final(pooled))

    def _pooled_packed(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The inference fast path (:func:`~clipforge.model.layers.use_fast_paths`): the real tokens only, packed
        into groups of similar length, the last block computed for each end token alone; [B, W]."""
        cost = ATTENTION_GROUP_COST.get(tokens.device.type, ATTENTION_GROUP_COST_OTHER)
        packing = Packing(lengths, group_cost=cost)  # one host sync
        ids = tokens[:, : packing.length].flatten()[packing.index]
        positions = packing.index % packing.length
        x = self.token_embed(ids) + self.pos_embed[positions]  # [T, W]: real tokens only
        return self.transformer(x, causal=True, rows=packing.last, packing=packing)

    @torch.no_grad()
    def resize_context(self, context_length: int) -> None:
        """Truncate (or linearly stretch) the position embedding to ``context_length`` tokens."""
        self.pos_embed = nn.Parameter(resample_sequence_pos_embed(self.pos_embed.data, context_length))
        self.context_length = context_length
