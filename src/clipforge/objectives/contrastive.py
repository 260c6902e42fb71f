"""CLIP's objective: the symmetric contrastive loss between image and text embeddings (the paper's choice), or
SigLIP's sigmoid loss on the same two-tower model (``loss="sigmoid"``).

Gradients (:func:`compute_gradients`): with several micro-batches the contrastive batch stays whole: features of
every micro-batch are computed without gradients and cached, the loss over the full batch gives the gradient
with respect to each feature, then each micro-batch is recomputed with gradients and back-propagated with its
slice of that gradient. The result equals the gradient of one batch N times larger (models without
batch-dependent layers; the ResNet towers' BatchNorm sees each micro-batch alone). The recompute replays torch's
RNG from before the cached pass, so random layers (ViT patch dropout) make the same draws in both passes.

Zero-shot: each class's prompts are embedded, averaged (prompt ensembling) and compared with the image by
cosine similarity (:func:`clipforge.eval.zeroshot.build_classifier`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.config import ConfigError, ModelConfig
from clipforge.distributed import unwrap
from clipforge.losses import ContrastiveLoss, SigmoidLoss, caption_ids
from clipforge.model import CLIP
from clipforge.objectives.base import Autocast, MicroBatch, Tokenizer, ZeroShotScorer, gradient_sync

log = logging.getLogger("clipforge.train")

# (image_features, text_features, logit_scale, **extra) -> loss. Extra keywords, passed only when needed:
# logit_bias (the model has one) and caption_ids (the loss has ``multi_positive`` set).
LossFn = Callable[..., torch.Tensor]


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

    @classmethod
    def from_train_config(cls, config: Any) -> ContrastiveObjective:
        """Options from a :class:`~clipforge.train.config.TrainConfig`: ``loss.*`` and ``loss_chunk_size``."""
        loss = config.loss
        return cls(
            chunk_size=config.loss_chunk_size or None,
            loss=loss.kind,
            label_smoothing=loss.label_smoothing,
            multi_positive=loss.multi_positive,
        )

    def init_from(self, model: nn.Module, path: str) -> None:
        """Start from a CLIP checkpoint's weights; a softmax CLIP's has no ``logit_bias`` and a SigLIP model keeps
        its initial one."""
        from clipforge.checkpoint import load_checkpoint

        state = load_checkpoint(path, config=model.config).state_dict()
        if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state:
            state["logit_bias"] = model.logit_bias.detach().clone()
            log.info("init_from: %s has no logit_bias; it starts at %g", path, float(state["logit_bias"]))
        model.load_state_dict(state)

    def after_update(self, model: nn.Module) -> None:
        """The paper's clip of the learned temperature: the logit scale stays at most 100."""
        model.clamp_logit_scale_(100.0)

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


def compute_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: Sequence[MicroBatch],
    autocast: contextlib.AbstractContextManager
    | Callable[[], contextlib.AbstractContextManager]
    | None = None,
    loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradient of the contrastive loss over all ``micro_batches`` together.

    ``model`` may be wrapped in DistributedDataParallel or sharded with FSDP (gradients are synchronised on the
    last micro-batch only). ``loss_scale`` multiplies the loss before backward (fp16 grad scaling). Returns the loss (detached,
    this rank's share: see :class:`clipforge.losses.ContrastiveLoss`). A model with a ``logit_bias`` passes it
    to the loss; a loss with ``multi_positive`` gets the :func:`~clipforge.losses.caption_ids` of the tokens.
    """
    ctx = _context_factory(autocast)
    bias = getattr(unwrap(model), "logit_bias", None)
    extra: dict[str, torch.Tensor] = {} if bias is None else {"logit_bias": bias}
    if getattr(loss_fn, "multi_positive", False):
        extra["caption_ids"] = caption_ids(torch.cat([tokens for _, tokens in micro_batches]))
    if len(micro_batches) == 1:
        images, tokens = micro_batches[0]
        with ctx():
            out = model(images, tokens)
        loss = loss_fn(out.image_features, out.text_features, out.logit_scale, **extra)
        (loss_scale(loss) if loss_scale else loss).backward()
        return loss.detach()

    rng = _rng_state(micro_batches[0][0].device)
    with torch.no_grad(), ctx():
        outs = [model(images, tokens) for images, tokens in micro_batches]
    image_features = torch.cat([o.image_features.float() for o in outs]).requires_grad_(True)
    text_features = torch.cat([o.text_features.float() for o in outs]).requires_grad_(True)
    logit_scale = unwrap(model).logit_scale.exp()
    loss = loss_fn(image_features, text_features, logit_scale, **extra)
    (loss_scale(loss) if loss_scale else loss).backward()  # feature gradients; scale's and bias's directly

    _set_rng_state(rng)  # the recompute draws what the cached pass drew
    start = 0
    for index, (images, tokens) in enumerate(micro_batches):
        with gradient_sync(model, sync=index == len(micro_batches) - 1):
            with ctx():
                out = model(images, tokens)
            rows = slice(start, start + images.shape[0])
            tensors = [out.image_features, out.text_features]
            grads = [
                image_features.grad[rows].to(out.image_features.dtype),
                text_features.grad[rows].to(out.text_features.dtype),
            ]
            # Zero gradients for the temperature (already counted once, above): under DDP every trained
            # parameter must take part in the synchronised backward.
            for param in (out.logit_scale, bias):
                if param is not None and param.requires_grad:
                    tensors.append(param)
                    grads.append(torch.zeros_like(param))
            torch.autograd.backward(tensors, grads)
        start = rows.stop
    return loss.detach()


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.device]:
    """torch's CPU RNG state, and the state of ``device``'s generator when it is a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda, device


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None, torch.device]) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _context_factory(autocast) -> Callable[[], contextlib.AbstractContextManager]:
    if autocast is None:
        return contextlib.nullcontext
    if callable(autocast) and not isinstance(autocast, contextlib.AbstractContextManager):
        return autocast
    return lambda: autocast
