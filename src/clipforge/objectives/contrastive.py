"""CLIP's objective: the symmetric contrastive loss between image and text embeddings (the paper's choice), or
SigLIP's sigmoid loss on the same two-tower model (``loss="sigmoid"``).

Zero-shot: each class's prompts are embedded, averaged (prompt ensembling) and compared with the image by
cosine similarity (:func:`clipforge.eval.zeroshot.build_classifier`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ConfigError, ModelConfig
from clipforge.losses import ContrastiveLoss, SigmoidLoss
from clipforge.model import CLIP
from clipforge.objectives.base import Autocast, MicroBatch, Tokenizer, ZeroShotScorer


class ContrastiveObjective:
    name = "contrastive"

    def __init__(
        self,
        chunk_size: int | str | None = None,
        loss: str = "softmax",
        label_smoothing: float = 0.0,
        multi_positive: bool = False,
    ) -> None:
        # Only the options in use are passed: a loss class substituted for ContrastiveLoss needs chunk_size only.
        options: dict = {"chunk_size": chunk_size}
        if multi_positive:
            options["multi_positive"] = True
        if loss == "softmax":
            if label_smoothing:
                options["label_smoothing"] = label_smoothing
            self.loss: ContrastiveLoss | SigmoidLoss = ContrastiveLoss(**options)
        elif loss == "sigmoid":
            if label_smoothing:
                raise ConfigError("loss.label_smoothing: applies to the softmax loss only")
            self.loss = SigmoidLoss(**options)
        else:
            raise ConfigError(f"loss.kind: unknown loss {loss!r}; use 'softmax' or 'sigmoid'")
        self.kind = loss

    def build_model(self, config: ModelConfig) -> CLIP:
        if self.kind == "softmax" and config.init_logit_bias is not None:
            raise ConfigError(
                f"model '{config.name}' has init_logit_bias={config.init_logit_bias}, but the softmax loss has no "
                "bias to train; use loss.kind=sigmoid, or set model_overrides.init_logit_bias=null"
            )
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
