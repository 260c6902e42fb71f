"""The ViT image tower: patch convolution, class token, learned positions, pre-LN transformer, projection."""

from __future__ import annotations

import torch
from torch import nn

from clipforge.config import VisionConfig
from clipforge.model.layers import Transformer, resample_grid_pos_embed, use_fast_paths


class VisionTransformer(nn.Module):
    """Images [B, 3, S, S] -> embeddings [B, embed_dim] (the class token after ``norm_post``, projected)."""

    def __init__(self, config: VisionConfig, embed_dim: int, activation: str) -> None:
        super().__init__()
        assert config.patch_size is not None and isinstance(config.layers, int)
        width = config.width
        self.patch_size = config.patch_size
        self.grid_size = config.image_size // config.patch_size
        self.patch_dropout = config.patch_dropout
        self.patch_embed = nn.Conv2d(
            3, width, kernel_size=self.patch_size, stride=self.patch_size, bias=False
        )
        self.class_token = nn.Parameter(torch.empty(width))
        self.pos_embed = nn.Parameter(torch.empty(self.grid_size**2 + 1, width))
        self.norm_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, activation)
        self.norm_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        scale = self.class_token.shape[0] ** -0.5
        nn.init.normal_(self.class_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.proj.weight, std=scale)
        self.transformer.init_weights()

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``patch_embed`` (a stride-p, kernel-p convolution) as one matrix product over the flattened patches:
        [B, g_h*g_w, W] plus the grid. Same arithmetic; on the CPU the product is 1.3-1.5x faster than oneDNN's
        strided convolution (ViT-B/32, batch 32, bf16 weights: ~9 vs ~25 ms). Trailing pixels that do not fill a
        patch are dropped, as the convolution drops them. The inference fast path
        (:func:`~clipforge.model.layers.use_fast_paths`); training runs the convolution, whose gradients the bit-level
        accumulation tests are written against."""
        p = self.patch_size
        batch, channels, height, width = images.shape
        grid_h, grid_w = height // p, width // p
        patches = images[:, :, : grid_h * p, : grid_w * p].reshape(batch, channels, grid_h, p, grid_w, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, grid_h * grid_w, channels * p * p)
        weight = self.patch_embed.weight.reshape(self.patch_embed.out_channels, -1)
        return nn.functional.linear(patches, weight), grid_h, grid_w

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fast = use_fast_paths(self)
        if fast:  # the same arithmetic as the convolution, faster on the CPU
            x, grid_h, grid_w = self.embed_patches(images)  # [B, g*g, W]
        else:  # the reference (and training): the convolution, whose gradients the accumulation tests hold to 1e-6
            x = self.patch_embed(images)  # [B, W, g, g]
            grid_h, grid_w = x.shape[-2:]
            x = x.flatten(2).transpose(1, 2)
        batch, width = x.shape[0], x.shape[-1]
        if grid_h * grid_w + 1 != self.pos_embed.shape[0]:
            raise ValueError(
                f"images of {images.shape[-2]}x{images.shape[-1]} px give a {grid_h}x{grid_w} patch grid, but the "
                f"model expects {self.grid_size}x{self.grid_size} "
                f"({self.grid_size * self.patch_size} px); resize the images or call model.resize_image(size)"
            )
        class_token = self.class_token.to(x.dtype).expand(batch, 1, width)
        x = torch.cat([class_token, x], dim=1) + self.pos_embed.to(x.dtype)
        if self.training and self.patch_dropout:
            x = drop_patches(x, self.patch_dropout)
        x = self.norm_pre(x)
        if fast:  # the last block computes queries, attention output and MLP for the class token only
            pooled = self.transformer(x, rows=torch.zeros(batch, dtype=torch.long, device=x.device))
        else:  # the reference: every token through every block, then the class token
            pooled = self.transformer(x)[:, 0]
        return self.proj(self.norm_post(pooled))

    @torch.no_grad()
    def resize_image(self, image_size: int) -> None:
        """Resample the position embedding for ``image_size`` px inputs (bicubic on the patch grid)."""
        if image_size % self.patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {self.patch_size}")
        new_grid = image_size // self.patch_size
        self.pos_embed = nn.Parameter(resample_grid_pos_embed(self.pos_embed.data, new_grid))
        self.grid_size = new_grid


def kept_patches(num_patches: int, drop: float) -> int:
    """Patch tokens :func:`drop_patches` keeps of ``num_patches``: round((1 - drop) * N), at least one."""
    return max(1, round((1.0 - drop) * num_patches))


def drop_patches(tokens: torch.Tensor, drop: float) -> torch.Tensor:
    """FLIP's patch dropout: [B, 1 + N, W] (class token first) -> [B, 1 + K, W], K = :func:`kept_patches`.

    Each image keeps its own uniformly random K patches (in grid order) and its class token. The draw uses
    torch's global RNG on the tokens' device, so seeding and the trainer's RNG checkpoints reproduce it.
    """
    batch, length, width = tokens.shape
    keep = kept_patches(length - 1, drop)
    scores = torch.rand(batch, length - 1, device=tokens.device)
    index = scores.topk(keep, dim=1).indices.sort(dim=1).values + 1  # +1: skip the class token
    patches = tokens.gather(1, index.unsqueeze(-1).expand(batch, keep, width))
    return torch.cat([tokens[:, :1], patches], dim=1)
