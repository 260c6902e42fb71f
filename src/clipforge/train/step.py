"""The training step: forward, contrastive loss, backward, then clip, check and apply the update.

With several micro-batches the contrastive batch stays whole: features of every micro-batch are computed
without gradients and cached, the loss over the full batch gives the gradient with respect to each feature,
then each micro-batch is recomputed with gradients and back-propagated with its slice of that gradient. The
result equals the gradient of one batch N times larger (models without batch-dependent layers; the ResNet
towers' BatchNorm sees each micro-batch alone). The recompute replays torch's RNG from before the cached pass,
so random layers (ViT patch dropout) make the same draws in both passes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from clipforge.losses import caption_ids
from clipforge.model import CLIP

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (images [b, 3, S, S], tokens [b, L])
# (image_features, text_features, logit_scale, **extra) -> loss. Extra keywords, passed only when needed:
# logit_bias (the model has one) and caption_ids (the loss has ``multi_positive`` set).
LossFn = Callable[..., torch.Tensor]


def unwrap(model: nn.Module) -> CLIP:
    """The CLIP inside a DistributedDataParallel (or any ``.module``) wrapper."""
    return getattr(model, "module", model)  # type: ignore[return-value]


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

    ``model`` may be wrapped in DistributedDataParallel (gradients are synchronised on the last micro-batch
    only). ``loss_scale`` multiplies the loss before backward (fp16 grad scaling). Returns the loss (detached,
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
        last = index == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
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


def freeze_temperature(model: nn.Module) -> None:
    """Keep the logit scale (and bias) at their current values: no gradient, so no optimizer ever holds them.
    The trainer's clamp to 100 still applies."""
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(False)


def _context_factory(autocast) -> Callable[[], contextlib.AbstractContextManager]:
    if autocast is None:
        return contextlib.nullcontext
    if callable(autocast) and not isinstance(autocast, contextlib.AbstractContextManager):
        return autocast
    return lambda: autocast


@dataclass
class UpdateResult:
    applied: bool  # False when the loss or the gradient was not finite (the step was skipped)
    grad_norm: float


def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    grad_clip: float | None,
    scaler: torch.amp.GradScaler | None = None,
) -> UpdateResult:
    """Clip, check finiteness (agreed across ranks), step, zero the gradients, clamp the logit scale."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    finite = torch.isfinite(loss).all() & torch.isfinite(grad_norm)
    if dist.is_available() and dist.is_initialized():
        flag = finite.to(torch.float32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        finite = flag[0] > 0
    applied = bool(finite)
    if scaler is not None:
        if applied:
            scaler.step(optimizer)
        scaler.update()
    elif applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    inner = unwrap(model)
    if hasattr(inner, "clamp_logit_scale_"):  # the contrastive objective's temperature
        inner.clamp_logit_scale_(100.0)
    return UpdateResult(applied, float(grad_norm))
