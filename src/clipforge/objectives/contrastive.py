"""CLIP's objective: the symmetric contrastive loss between image and text embeddings (the paper's choice).

Zero-shot: each class's prompts are embedded, averaged (prompt ensembling) and compared with the image by
cosine similarity (:func:`clipforge.eval.zeroshot.build_classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ModelConfig
from clipforge.losses import ContrastiveLoss
from clipforge.model import CLIP
from clipforge.objectives.base import Autocast, MicroBatch, Tokenizer, ZeroShotScorer


class ContrastiveObjective:
    name = "contrastive"

    def __init__(self, chunk_size: int | str | None = None) -> None:
        self.loss = ContrastiveLoss(chunk_size=chunk_size)

    def build_model(self, config: ModelConfig) -> CLIP:
        return CLIP(config)

    def compute_gradients(
        self,
        model: nn.Module,
        micro_batches: Sequence[MicroBatch],
        autocast: Autocast = None,
        loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from clipforge.train.step import compute_gradients

        return compute_gradients(model, self.loss, micro_batches, autocast, loss_scale)

    def zero_shot_scorer(
        self, model: nn.Module, tokenizer: Tokenizer, classnames: Sequence[str], templates: Sequence[str]
    ) -> ZeroShotScorer:
        from clipforge.eval.zeroshot import build_classifier

        classifier = build_classifier(model, tokenizer, list(classnames), list(templates))

        def score(images: torch.Tensor) -> torch.Tensor:
            features = F.normalize(model.encode_image(images).float(), dim=-1)
            return features @ classifier.to(features.device, features.dtype)

        return score
