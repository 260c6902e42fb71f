"""The training step after the gradients (which each objective computes, e.g.
:func:`clipforge.objectives.contrastive.compute_gradients`): clip, check and apply the update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from clipforge.distributed import unwrap
from clipforge.train import fsdp


def freeze_temperature(model: nn.Module) -> None:
    """Keep the logit scale (and bias) at their current values: no gradient, so no optimizer ever holds them.
    The contrastive objective's clamp to 100 still applies."""
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(False)


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
    after_update: Callable[[nn.Module], None] | None = None,
) -> UpdateResult:
    """Clip, check finiteness (agreed across ranks), step, zero the gradients, then ``after_update(bare model)``
    (the objective's hook: CLIP clamps its logit scale). A sharded (FSDP) model's replicated parameters get their
    gradients averaged over the ranks first."""
    fsdp.sync_replicated_gradients(model)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip else float("inf")
    clip = fsdp.clip_grad_norm if fsdp.is_sharded(model) else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(params, max_norm) if params else torch.zeros(())
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
    if after_update is not None:
        after_update(unwrap(model))
    return UpdateResult(applied, float(grad_norm))
