"""Layers both towers use: activations, multi-head attention, the MLP, the pre-LN residual block and the stack,
plus position-embedding resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's released CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation '{name}'; use 'quick_gelu' or 'gelu'")


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (the layout of ``nn.MultiheadAttention``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x: [B, L, W] -> [B, L, W]."""
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, Dh]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of residual blocks on [B, L, W] tensors, with optional gradient checkpointing per block."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, activation) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        """OpenAI's initialisation: std width^-0.5 for attention inputs, scaled by depth for output projections."""
        width, layers = self.width, len(self.blocks)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)


def resample_grid_pos_embed(pos_embed: torch.Tensor, new_grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """Bicubically resample a [extra + g*g, W] position embedding to [extra + new_grid**2, W].

    The first ``extra_tokens`` rows (the class token / pooled token) are kept as they are.
    """
    extra, grid_tokens = pos_embed[:extra_tokens], pos_embed[extra_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[0])
    if old_grid * old_grid != grid_tokens.shape[0]:
        raise ValueError(f"position embedding of {grid_tokens.shape[0]} grid tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    width = grid_tokens.shape[1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=0)


def resample_sequence_pos_embed(pos_embed: torch.Tensor, new_length: int) -> torch.Tensor:
    """Resize a [L, W] text position embedding to [new_length, W].

    Shorter: keep the first rows (positions keep their meaning under a causal mask). Longer: linear interpolation.
    """
    length = pos_embed.shape[0]
    if new_length <= length:
        return pos_embed[:new_length].clone()
    seq = pos_embed.t().unsqueeze(0).float()  # [1, W, L]
    seq = F.interpolate(seq, size=new_length, mode="linear", align_corners=True)
    return seq.squeeze(0).t().contiguous().to(pos_embed.dtype)
