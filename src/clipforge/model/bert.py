"""A BERT encoder used as a sentence-embedding text tower (all-MiniLM-L6-v2): token, position and segment
embeddings, post-LayerNorm transformer layers with GELU, then mean pooling over the real tokens (optionally
L2-normalised), as sentence-transformers pools it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.model.layers import MLP, Attention


@dataclass(frozen=True)
class BertConfig:
    """The encoder's shape, as a Hugging Face BERT ``config.json`` states it."""

    vocab_size: int = 30522
    width: int = 384  # hidden_size
    layers: int = 6  # num_hidden_layers
    heads: int = 12  # num_attention_heads
    mlp_width: int = 1536  # intermediate_size
    max_positions: int = 512  # max_position_embeddings
    segments: int = 2  # type_vocab_size
    norm_eps: float = 1e-12  # layer_norm_eps
    dropout: float = 0.1  # hidden_dropout_prob
    attention_dropout: float = 0.1  # attention_probs_dropout_prob
    pad_token_id: int = 0
    normalize: bool = True  # L2-normalise the pooled features (sentence-transformers' Normalize module)


class BertEmbeddings(nn.Module):
    """Token + position + segment-0 embeddings, LayerNorm, dropout: ids [B, L] -> [B, L, W]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.token_embed = nn.Embedding(config.vocab_size, config.width)
        self.pos_embed = nn.Parameter(torch.zeros(config.max_positions, config.width))
        self.segment_embed = nn.Parameter(torch.zeros(config.segments, config.width))
        self.norm = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.token_embed(tokens) + (self.pos_embed[:length] + self.segment_embed[0])
        return self.dropout(self.norm(x))


class BertLayer(nn.Module):
    """Post-LayerNorm block: x = norm1(x + attn(x)); x = norm2(x + mlp(x)), dropout on both branches."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = Attention(config.width, config.heads, dropout=config.attention_dropout)
        self.norm1 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.mlp = MLP(config.width, config.mlp_width, "gelu")
        self.norm2 = nn.LayerNorm(config.width, eps=config.norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, L, W], mask [B, 1, 1, L] (True: a real token) -> [B, L, W]."""
        x = self.norm1(x + self.dropout(self.attn(x, mask=mask)))
        return self.norm2(x + self.dropout(self.mlp(x)))


class BertEncoder(nn.Module):
    """Token ids [B, L] -> sentence features [B, W]: the mean of the last layer over each row's real tokens.

    A row's real tokens are those up to its last non-[PAD] id (rows are ``[CLS] ids [SEP]`` then [PAD], so this
    is the tokenizer's attention mask, also when a text contains a literal "[PAD]"). The batch is cut to its
    longest row first; padding never changes a real token's value.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.layers))
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def width(self) -> int:
        return self.config.width

    def init_weights(self) -> None:
        """BERT's initialisation (normal, std 0.02; LayerNorms at identity); pretrained weights replace it."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embeddings.pos_embed, std=0.02)
        nn.init.normal_(self.embeddings.segment_embed, std=0.02)

    def units(self) -> list[nn.Module]:
        """The encoder's parts from input to output (what ``unlocked_layers`` counts from the top)."""
        return [self.embeddings, *self.layers]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"expected token ids of shape [batch, length], got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_positions:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds BERT's {self.config.max_positions} positions; tokenize "
                "with clipforge.get_tokenizer(model)"
            )
        positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
        lengths = (
            ((tokens != self.config.pad_token_id) * positions).amax(dim=1)
            if tokens.numel()
            else positions[:0]
        )
        longest = max(int(lengths.max()), 1) if lengths.numel() else 1
        tokens = tokens[:, :longest]
        real = positions[:longest] <= lengths[:, None]  # [B, L]
        x = self.embeddings(tokens)
        mask = real[:, None, None, :]
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        weights = real.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.config.normalize else pooled
