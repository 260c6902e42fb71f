"""CLIP's symmetric softmax (InfoNCE) contrastive loss: exact, across processes, and in bounded memory."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from clipforge.distributed import all_gather_with_grad, is_distributed
from clipforge.losses.chunks import BlockGradients
from clipforge.losses.inputs import ChunkSize, _no_autocast, _resolve_chunk, _upcast
from clipforge.losses.positives import _checked_ids, _gathered_ids, _Positives, _required_ids, _unless_unique


def _mix(positive: Tensor, mean: Tensor | None, smoothing: float) -> Tensor:
    """Σ_j t_ij · logit_ij for label-smoothed targets t = (1 − ε)·(positives) + ε / N (``mean``: row means)."""
    if not smoothing:
        return positive
    assert mean is not None
    return (1 - smoothing) * positive + smoothing * mean


class _ChunkedInfoNCE(torch.autograd.Function):
    """mean_i CE(s · q_i Kᵀ, targets_i) for queries Q [n, D], keys K [N, D], scale s; one direction.

    Targets: the key ``offset + i``, or (with ``query_ids``/``key_ids``) uniform over the keys with the query's
    id; label-smoothed by ``smoothing`` as ``F.cross_entropy(label_smoothing=...)`` does.
    """

    @staticmethod
    def forward(
        ctx,
        queries: Tensor,
        keys: Tensor,
        scale: Tensor,
        offset: int,
        chunk: int,
        smoothing: float = 0.0,
        query_ids: Tensor | None = None,
        key_ids: Tensor | None = None,
    ) -> Tensor:
        n = queries.shape[0]
        positives = _Positives(offset, query_ids, key_ids)
        lse = queries.new_empty(n)
        target = queries.new_empty(n)
        for start in range(0, n, chunk):
            block = (scale * queries[start : start + chunk]) @ keys.T
            mean = block.mean(dim=1) if smoothing else None
            target[start : start + chunk] = _mix(positives.mean_logit(block, start), mean, smoothing)
            lse[start : start + chunk] = torch.logsumexp(block, dim=1)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.positives, ctx.chunk, ctx.smoothing = positives, chunk, smoothing
        return (lse - target).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        queries, keys, scale, lse = ctx.saved_tensors
        n, chunk, positives, smoothing = queries.shape[0], ctx.chunk, ctx.positives, ctx.smoothing
        weight = grad_loss / n
        grads = BlockGradients(queries, keys, scale, ctx.needs_input_grad[:3])
        for start in range(0, n, chunk):
            # dCE/dlogits = softmax - targets, rebuilt in place in the recomputed logits block.
            block = (scale * queries[start : start + chunk]) @ keys.T
            block.sub_(lse[start : start + chunk, None]).exp_()
            positives.subtract_targets(block, start, 1.0 - smoothing)
            if smoothing:
                block.sub_(smoothing / block.shape[1])
            grads.add(block.mul_(weight), start)
        return *grads.result(), None, None, None, None, None


class _ChunkedSymmetricInfoNCE(torch.autograd.Function):
    """(CE(s X Yᵀ, targets) + CE(s Y Xᵀ, targets)) / 2 for X, Y [B, D] in one pass over row blocks of X Yᵀ.

    Row log-sum-exps give the image→text term, running column log-sum-exps the text→image term, so every
    block is multiplied once forward and once backward (half the work of two one-direction passes). Targets as
    in :class:`_ChunkedInfoNCE` (``ids``: one caption id per pair, for both towers).
    """

    @staticmethod
    def forward(
        ctx,
        image: Tensor,
        text: Tensor,
        scale: Tensor,
        chunk: int,
        smoothing: float = 0.0,
        ids: Tensor | None = None,
    ) -> Tensor:
        batch = image.shape[0]
        positives = _Positives(0, ids, ids)
        row_lse = image.new_empty(batch)
        positive = image.new_empty(batch)
        col_positive = image.new_zeros(batch) if ids is not None else positive
        row_mean = image.new_empty(batch) if smoothing else None
        col_total = image.new_zeros(batch) if smoothing else None
        col_max = image.new_full((batch,), float("-inf"))
        col_sum = image.new_zeros(batch)
        for start in range(0, batch, chunk):
            block = (scale * image[start : start + chunk]) @ text.T
            positive[start : start + chunk] = positives.mean_logit(block, start)
            if ids is not None:  # Σ_i over the column's positives; divided by the (symmetric) counts below
                col_positive += torch.where(positives.mask(start, start + block.shape[0]), block, 0.0).sum(0)
            if smoothing:
                row_mean[start : start + chunk] = block.mean(dim=1)
                col_total += block.sum(dim=0)
            row_lse[start : start + chunk] = torch.logsumexp(block, dim=1)
            # Online log-sum-exp down the columns: rescale the running sum to the new running max.
            new_max = torch.maximum(col_max, block.amax(dim=0))
            col_sum.mul_(torch.exp(col_max - new_max)).add_(block.sub_(new_max).exp_().sum(dim=0))
            col_max = new_max
        col_lse = col_max + torch.log(col_sum)
        if ids is not None:
            col_positive = col_positive / positives.query_counts.to(col_positive.dtype)
        row_target = _mix(positive, row_mean, smoothing)
        col_target = _mix(col_positive, col_total / batch if smoothing else None, smoothing)
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.positives, ctx.chunk, ctx.smoothing = positives, chunk, smoothing
        return ((row_lse - row_target).mean() + (col_lse - col_target).mean()) / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        batch, chunk, positives, smoothing = image.shape[0], ctx.chunk, ctx.positives, ctx.smoothing
        weight = grad_loss / (2 * batch)
        grads = BlockGradients(image, text, scale, ctx.needs_input_grad[:3])
        for start in range(0, batch, chunk):
            # Row softmax + column softmax - row targets - column targets: both directions' gradient.
            block = (scale * image[start : start + chunk]) @ text.T
            col_softmax = torch.sub(block, col_lse).exp_()
            block.sub_(row_lse[start : start + chunk, None]).exp_().add_(col_softmax)
            del col_softmax
            if positives.diagonal:
                positives.subtract_targets(block, start, 2.0 * (1.0 - smoothing))
            else:  # row targets 1/count_i, column targets 1/count_j on the positives
                positives.subtract_targets(block, start, 1.0 - smoothing)
                mask = positives.mask(start, start + block.shape[0])
                block.sub_(mask * ((1.0 - smoothing) / positives.query_counts[None, :].to(block.dtype)))
                del mask
            if smoothing:
                block.sub_(2 * smoothing / batch)
            grads.add(block.mul_(weight), start)
        return *grads.result(), None, None, None


def _soft_targets(positives: _Positives, logits: Tensor) -> Tensor:
    """Probability targets for ``logits`` [n, N] (its shape and dtype): each row uniform over its positives."""
    mask = positives.dense(*logits.shape, logits.device).to(logits.dtype)
    return mask / mask.sum(dim=1, keepdim=True)


def _one_direction(
    queries: Tensor,
    keys: Tensor,
    scale: Tensor,
    offset: int,
    chunk: int | None,
    smoothing: float = 0.0,
    query_ids: Tensor | None = None,
    key_ids: Tensor | None = None,
) -> Tensor:
    """Mean over query rows i of CE(s · q_i Kᵀ) with the positive at key ``offset + i`` (or, with ids, the keys
    sharing the query's id)."""
    if chunk is None:
        logits = scale * queries @ keys.T
        if query_ids is None:
            targets = torch.arange(queries.shape[0], device=queries.device) + offset
        else:
            targets = _soft_targets(_Positives(offset, query_ids, key_ids), logits)
        return F.cross_entropy(logits, targets, label_smoothing=smoothing)
    return _ChunkedInfoNCE.apply(queries, keys, scale, offset, chunk, smoothing, query_ids, key_ids)


def _check_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    return float(label_smoothing)


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    chunk_size: ChunkSize = None,
    *,
    label_smoothing: float = 0.0,
    caption_ids: Tensor | None = None,
) -> Tensor:
    """CLIP's symmetric InfoNCE loss for one process.

    image_features, text_features: [B, D], L2-normalised, row i of each is a positive pair.
    logit_scale: scalar, already exponentiated (1 / temperature).
    Returns (CE(s X Yᵀ, arange(B)) + CE(s Y Xᵀ, arange(B))) / 2 as a scalar, computed in float32 whatever the
    input dtype and even under autocast (float64 input stays float64). ``chunk_size`` (int or ``"auto"``)
    gives the same value and gradients in O(chunk_size × B) extra memory; None builds the B×B logits.
    ``label_smoothing``: as ``F.cross_entropy(label_smoothing=...)``. ``caption_ids`` [B]: pairs with equal ids
    are positives of each other; each row's target is uniform over its positives, in both directions (with
    all ids distinct this is the plain loss, bit for bit).
    """
    image, text, scale = _upcast(image_features, text_features, logit_scale)
    smoothing = _check_smoothing(label_smoothing)
    ids = _unless_unique(_checked_ids(caption_ids, image.shape[0]))
    chunk = _resolve_chunk(chunk_size, image.shape[0])
    with _no_autocast(image.device):
        if chunk is None:
            logits_per_image = scale * image @ text.T
            if ids is None:
                targets = torch.arange(image.shape[0], device=image.device)
            else:  # the positive mask is symmetric, so one matrix serves both directions
                targets = _soft_targets(_Positives(0, ids, ids), logits_per_image)
            return (
                F.cross_entropy(logits_per_image, targets, label_smoothing=smoothing)
                + F.cross_entropy(logits_per_image.T, targets, label_smoothing=smoothing)
            ) / 2
        return _ChunkedSymmetricInfoNCE.apply(image, text, scale, chunk, smoothing, ids)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss, gathered across ranks when a process group is initialised.

    forward(image_features [b, D], text_features [b, D], logit_scale scalar, caption_ids [b] = None) -> scalar,
    float32 whatever the input dtype (bf16/fp16 are cast up; float64 stays float64).

    With a process group of W ranks and ``gather=True``, each rank's local rows are scored against the
    features of all W·b pairs (gathered with gradients) and the loss is the mean over its local rows. The
    per-rank values average to the loss of the whole global batch, and under DistributedDataParallel (which
    averages gradients) every parameter gets exactly the single-process gradient of the global batch.
    ``gather=False`` (or no process group) scores each rank's batch on its own. Local batch sizes must be
    equal across ranks. ``chunk_size``, ``label_smoothing``: see :func:`contrastive_loss`. ``multi_positive``:
    pairs with equal ``caption_ids`` (gathered too) are positives of each other; forward then needs the ids.
    """

    multi_positive: bool

    def __init__(
        self,
        chunk_size: ChunkSize = None,
        gather: bool = True,
        label_smoothing: float = 0.0,
        multi_positive: bool = False,
    ) -> None:
        super().__init__()
        _resolve_chunk(chunk_size, 1)  # validate early
        self.chunk_size = chunk_size
        self.gather = gather
        self.label_smoothing = _check_smoothing(label_smoothing)
        self.multi_positive = multi_positive

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | None = None,
        caption_ids: Tensor | None = None,
    ) -> Tensor:
        if logit_bias is not None:
            raise ValueError(
                "the softmax contrastive loss has no logit bias (softmax is unchanged by one); use SigmoidLoss, or "
                "a model without init_logit_bias"
            )
        ids = _required_ids(self.multi_positive, caption_ids)
        if not (self.gather and is_distributed()):
            return contrastive_loss(image_features, text_features, logit_scale, self.chunk_size,
                                    label_smoothing=self.label_smoothing, caption_ids=ids)  # fmt: skip
        image, text, scale = _upcast(image_features, text_features, logit_scale)
        # One collective for both towers: gather [b, 2D], then split.
        gathered = all_gather_with_grad(
            torch.cat([image, text], dim=1), what="[image_features | text_features] ([b, 2 * D])"
        )
        all_image, all_text = gathered.split(image.shape[1], dim=1)
        batch = image.shape[0]
        offset = dist.get_rank() * batch
        all_ids = _gathered_ids(ids, batch)
        local_ids = all_ids[offset : offset + batch] if all_ids is not None else None
        chunk = _resolve_chunk(self.chunk_size, gathered.shape[0])
        with _no_autocast(image.device):
            options = (self.label_smoothing, local_ids, all_ids)
            image_to_text = _one_direction(image, all_text, scale, offset, chunk, *options)
            text_to_image = _one_direction(text, all_image, scale, offset, chunk, *options)
            return (image_to_text + text_to_image) / 2

    def extra_repr(self) -> str:
        return (
            f"chunk_size={self.chunk_size!r}, gather={self.gather}, label_smoothing={self.label_smoothing}, "
            f"multi_positive={self.multi_positive}"
        )
