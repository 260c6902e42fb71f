"""What every training objective provides, and the plain gradient accumulation the non-contrastive ones share.

An objective decides these things and nothing else: its options (read from the run's config by
``from_train_config``), the model it trains (an image tower plus its own head) and whether that model can start
from a checkpoint, the gradient of its loss over a step's micro-batches, what must happen after each update
(CLIP's logit-scale clamp), and how that model classifies images zero-shot from class names. The run loop
(:mod:`clipforge.train.loop`), the data stream, the optimizer, checkpoints and evaluation hooks are the same for
all objectives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from clipforge.config import ConfigError, ModelConfig

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images [b, 3, S, S], tokens [b, L])
Autocast = Callable[[], contextlib.AbstractContextManager] | None
Tokenizer = Callable[[list[str]], torch.Tensor]


class ZeroShotScorer(Protocol):
    """Scores preprocessed images against the classes it was built for: ``[N, 3, S, S] -> [N, C]``, higher is
    more likely; the arg-max is the prediction."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class Objective(Protocol):
    name: str

    @classmethod
    def from_train_config(cls, config: Any) -> Objective:
        """The objective with the options a :class:`~clipforge.train.config.TrainConfig` gives it."""
        ...

    def build_model(self, config: ModelConfig) -> nn.Module:
        """A randomly initialised model for ``config`` with ``.config``, ``encode_image`` and
        ``set_grad_checkpointing`` (so tokenizer, transforms and the trainer work unchanged)."""
        ...

    def compute_gradients(
        self,
        model: nn.Module,
        micro_batches: Sequence[MicroBatch],
        autocast: Autocast = None,
        loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Accumulate into ``.grad`` the gradient of the loss over the step's whole batch; return the loss."""
        ...

    def init_from(self, model: nn.Module, path: str) -> None:
        """Load the weights of checkpoint ``path`` into ``model`` (``init_from``), or raise ConfigError."""
        ...

    def after_update(self, model: nn.Module) -> None:
        """Called on the bare model after every optimizer step that was applied or skipped."""
        ...

    def zero_shot_scorer(
        self, model: nn.Module, tokenizer: Tokenizer, classnames: Sequence[str], templates: Sequence[str]
    ) -> ZeroShotScorer:
        """A scorer for these classes with the model's current weights (call under ``torch.no_grad()``)."""
        ...


class TowerlessObjective:
    """What the objectives that build their own image tower and head share: no pretrained towers, no CLIP
    checkpoint to start from, nothing to do after an update, no options."""

    name = ""

    @classmethod
    def from_train_config(cls, config: Any) -> TowerlessObjective:
        return cls()

    def check_model_config(self, config: ModelConfig) -> None:
        if config.vision.tower or config.text.tower:
            raise ConfigError(
                f"objective '{self.name}' builds its own towers; pretrained towers (vision.tower, text.tower) are "
                "for the contrastive objective"
            )

    def init_from(self, model: nn.Module, path: str) -> None:
        raise ConfigError(
            f"init_from: only the contrastive objective can start from a CLIP checkpoint, not objective "
            f"'{self.name}'"
        )

    def after_update(self, model: nn.Module) -> None:
        return None


def gradient_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's backward: gradients synchronised over the ranks (``sync``, the step's last
    micro-batch) or accumulated locally (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync(False)``)."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def accumulate_gradients(
    model: nn.Module,
    loss_of: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    micro_batches: Sequence[MicroBatch],
    autocast: Autocast = None,
    loss_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weight_of: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
) -> torch.Tensor:
    """Gradient of the batch-mean loss over all micro-batches, for losses that are means over items.

    Each micro-batch's mean loss is weighted by its share of the items (``weight_of(images, tokens)``; default:
    its number of images), so the accumulated gradient equals one pass over the concatenated batch. Under
    DistributedDataParallel or FSDP gradients are synchronised on the last micro-batch only. Returns the batch-mean
    loss (detached).
    """
    weight_of = weight_of or (lambda images, tokens: float(images.shape[0]))
    weights = [weight_of(images, tokens) for images, tokens in micro_batches]
    total = sum(weights)
    ctx = autocast or contextlib.nullcontext
    loss_sum = torch.zeros(())
    for index, (images, tokens) in enumerate(micro_batches):
        with gradient_sync(model, sync=index == len(micro_batches) - 1):
            with ctx():
                loss = loss_of(model, images, tokens).float() * (weights[index] / total)
            (loss_scale(loss) if loss_scale else loss).backward()
        loss_sum = loss_sum + loss.detach().cpu()
    return loss_sum


def build_image_tower(config: ModelConfig) -> nn.Module:
    """The image tower CLIP would use for ``config`` (ViT or ModifiedResNet), ending in ``embed_dim`` features."""
    from clipforge.model.resnet import ModifiedResNet
    from clipforge.model.vision import VisionTransformer

    if config.vision.arch == "vit":
        return VisionTransformer(config.vision, config.embed_dim, config.activation)
    return ModifiedResNet(config.vision, config.embed_dim)


def set_tower_checkpointing(visual: nn.Module, enabled: bool) -> None:
    """Gradient checkpointing for an image tower, as :meth:`CLIP.set_grad_checkpointing` does it."""
    target = getattr(visual, "transformer", visual)
    target.grad_checkpointing = enabled
