"""CLIP: an image tower and a text tower projected into one embedding space, plus a learned temperature."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig, merge
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.text import TextTransformer
from clipforge.model.towers import build_tower, frozen_modules, lock_tower
from clipforge.model.vision import VisionTransformer


class CLIPOutput(NamedTuple):
    """What ``CLIP.forward`` returns, always.

    image_features: [B, D], L2-normalised. text_features: [B, D], L2-normalised.
    logit_scale: scalar, ``exp`` of the learned log-scale (1 / temperature).
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor


class CLIP(nn.Module):
    """The two-tower CLIP model described by a :class:`ModelConfig`.

    ``logit_scale`` holds log(1/τ), initialised to ln(1/0.07). The trainer clamps it so the scale never
    exceeds 100 (:meth:`clamp_logit_scale_`); the model itself never changes it outside training.

    A tower named in the config (``vision.tower`` / ``text.tower``) is a pretrained
    :class:`~clipforge.model.towers.PretrainedTower` with its package's weights; :meth:`lock` freezes a tower
    for LiT training.

    ``logit_bias`` (a scalar, SigLIP's b) exists only when ``config.init_logit_bias`` is set, else it is None;
    :class:`clipforge.losses.SigmoidLoss` takes it beside the forward output.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vision = config.vision
        if vision.tower is not None:
            self.visual: nn.Module = build_tower(vision.tower, config.embed_dim, tuple(vision.pool_blocks))
        elif vision.arch == "vit":
            self.visual = VisionTransformer(vision, config.embed_dim, config.activation)
        else:
            self.visual = ModifiedResNet(vision, config.embed_dim)
        if config.text.tower is not None:
            self.text: nn.Module = build_tower(config.text.tower, config.embed_dim)
        else:
            self.text = TextTransformer(config.text, config.embed_dim, config.activation)
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        self.locked_modules: list[nn.Module] = []  # kept in eval mode by train(); see lock()
        # SigLIP's learned bias, only when the config asks for one: CLIP checkpoints keep their exact key set.
        bias = config.init_logit_bias
        self.register_parameter("logit_bias", None if bias is None else nn.Parameter(torch.tensor(bias)))

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, S, S] (preprocessed) -> [B, embed_dim]."""
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """token ids [B, L] (L ≤ context length) -> [B, embed_dim]."""
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> CLIPOutput:
        return CLIPOutput(
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            self.logit_scale.exp(),
        )

    @torch.no_grad()
    def clamp_logit_scale_(self, max_scale: float = 100.0) -> None:
        """Clip the learned scale to [1, max_scale] in place (the paper clips at 100)."""
        self.logit_scale.clamp_(0.0, float(torch.log(torch.tensor(max_scale))))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass (per transformer block / ResNet stage / tower block)."""
        for tower in (self.visual, self.text):
            getattr(tower, "transformer", tower).grad_checkpointing = enabled

    def lock(self, tower: Literal["image", "text"], unlocked_layers: int = 0) -> None:
        """Lock a tower (LiT): its parameters stop training except its projection into the joint space and its
        top ``unlocked_layers`` layers, and its frozen parts stay in eval mode through :meth:`train` (no
        dropout, BatchNorm statistics frozen). See :func:`clipforge.model.towers.lock_tower`."""
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        lock_tower(self.visual if tower == "image" else self.text, unlocked_layers)
        self.locked_modules = [*frozen_modules(self.visual), *frozen_modules(self.text)]
        self.train(self.training)

    def train(self, mode: bool = True) -> CLIP:
        super().train(mode)
        for module in self.locked_modules:
            module.eval()
        return self

    def resize_image(self, image_size: int) -> None:
        """Resample image position embeddings for ``image_size`` px and update the config."""
        self.visual.resize_image(image_size)
        self.config = merge(self.config, {"vision.image_size": image_size})

    def resize_context(self, context_length: int) -> None:
        """Change the text context length (truncate or interpolate positions) and update the config."""
        self.text.resize_context(context_length)
        self.config = merge(self.config, {"text.context_length": context_length})
