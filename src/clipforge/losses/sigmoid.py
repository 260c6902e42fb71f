"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023): exact, across processes, and in bounded memory."""

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


def _signed_logits(
    queries: Tensor, keys: Tensor, scale: Tensor, bias: Tensor, positives: _Positives, start: int
):
    """z ⊙ (s Q Kᵀ + b) for a block of query rows: z = +1 on the positives, -1 elsewhere."""
    block = (scale * queries) @ keys.T
    block.add_(bias).neg_()
    _negate_positives(block, positives, start)
    return block


def _negate_positives(block: Tensor, positives: _Positives, start: int) -> None:
    if positives.diagonal:
        index = positives.diagonal_index(block, start)
        block[index] = -block[index]
    else:
        block.mul_(positives.mask(start, start + block.shape[0]).to(block.dtype).mul_(-2).add_(1))


class _ChunkedSigmoid(torch.autograd.Function):
    """-(1/n) Σ_i Σ_j log σ(z_ij (s q_i·k_j + b)) for queries Q [n, D], keys K [N, D], scale s, bias b.

    z_ij = +1 for the positives (key ``offset + i``, or the keys sharing the query's id), -1 otherwise. The
    gradient with respect to each logit is σ(l_ij) - [positive], computed as -z σ(-z l) (no cancellation).
    """

    @staticmethod
    def forward(
        ctx,
        queries: Tensor,
        keys: Tensor,
        scale: Tensor,
        bias: Tensor,
        offset: int,
        chunk: int,
        query_ids: Tensor | None = None,
        key_ids: Tensor | None = None,
    ) -> Tensor:
        n = queries.shape[0]
        positives = _Positives(offset, query_ids, key_ids)
        total = torch.zeros((), dtype=torch.float64, device=queries.device)
        for start in range(0, n, chunk):
            block = _signed_logits(queries[start : start + chunk], keys, scale, bias, positives, start)
            total += F.logsigmoid(block).sum()
        ctx.save_for_backward(queries, keys, scale, bias)
        ctx.positives, ctx.chunk = positives, chunk
        return (-total / n).to(queries.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        queries, keys, scale, bias = ctx.saved_tensors
        need_bias = ctx.needs_input_grad[3]
        n, chunk, positives = queries.shape[0], ctx.chunk, ctx.positives
        weight = grad_loss / n
        grads = BlockGradients(queries, keys, scale, ctx.needs_input_grad[:3])
        grad_bias = torch.zeros((), dtype=torch.float64, device=bias.device)
        for start in range(0, n, chunk):
            block = _signed_logits(queries[start : start + chunk], keys, scale, bias, positives, start)
            block.neg_().sigmoid_()  # σ(-z l)
            _negate_positives(block, positives, start)  # -z σ(-z l) = dloss/dlogit
            block.mul_(weight)
            if need_bias:
                grad_bias += block.sum()
            grads.add(block, start)
        grad_queries, grad_keys, grad_scale = grads.result()
        bias_grad = grad_bias.to(bias.dtype) if need_bias else None
        return grad_queries, grad_keys, grad_scale, bias_grad, None, None, None, None


def _sigmoid(
    queries: Tensor,
    keys: Tensor,
    scale: Tensor,
    bias: Tensor,
    offset: int,
    chunk: int | None,
    query_ids: Tensor | None = None,
    key_ids: Tensor | None = None,
) -> Tensor:
    if chunk is None:
        logits = scale * queries @ keys.T + bias
        positive = _Positives(offset, query_ids, key_ids).dense(*logits.shape, logits.device)
        signs = positive.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum() / queries.shape[0]
    return _ChunkedSigmoid.apply(queries, keys, scale, bias, offset, chunk, query_ids, key_ids)


def _upcast_bias(logit_bias: Tensor | float | None, like: Tensor) -> Tensor:
    bias = torch.as_tensor(0.0 if logit_bias is None else logit_bias, device=like.device)
    if bias.numel() != 1:
        raise ValueError(f"logit_bias must be a scalar, got shape {list(bias.shape)}")
    return bias.to(like.dtype).reshape(())


def sigmoid_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    chunk_size: ChunkSize = None,
    *,
    caption_ids: Tensor | None = None,
) -> Tensor:
    """SigLIP's sigmoid loss (Zhai et al. 2023) for one process.

    image_features, text_features: [B, D], L2-normalised, row i of each is a positive pair. logit_scale t:
    scalar, already exponentiated; logit_bias b: scalar (None: 0). Returns
    -(1/B) Σ_i Σ_j log σ(z_ij (t ⟨x_i, y_j⟩ + b)) with z = +1 for positives and -1 otherwise, in float32 (float64
    stays float64). ``caption_ids`` [B]: every pair of equal ids is a positive. ``chunk_size``: as in
    :func:`contrastive_loss` (same value and gradients, bounded memory).
    """
    image, text, scale = _upcast(image_features, text_features, logit_scale)
    bias = _upcast_bias(logit_bias, image)
    ids = _unless_unique(_checked_ids(caption_ids, image.shape[0]))
    chunk = _resolve_chunk(chunk_size, image.shape[0])
    with _no_autocast(image.device):
        return _sigmoid(image, text, scale, bias, 0, chunk, ids, ids)


class SigmoidLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss, gathered across ranks when a process group is initialised.

    forward(image_features [b, D], text_features [b, D], logit_scale scalar, logit_bias scalar | None,
    caption_ids [b] = None) -> scalar (float32; float64 stays float64). See :func:`sigmoid_loss`.

    With W ranks and ``gather=True``, each rank scores its b images against the text features of all W·b pairs
    (gathered with gradients) and divides by b: the per-rank values average to the global-batch loss, and under
    DistributedDataParallel every parameter gets the single-process gradient of the global batch (every
    (image, text) pair is scored on exactly one rank). ``multi_positive``: pairs with equal ``caption_ids``
    (gathered too) are positives.
    """

    multi_positive: bool

    def __init__(
        self, chunk_size: ChunkSize = None, gather: bool = True, multi_positive: bool = False
    ) -> None:
        super().__init__()
        _resolve_chunk(chunk_size, 1)  # validate early
        self.chunk_size = chunk_size
        self.gather = gather
        self.multi_positive = multi_positive

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        caption_ids: Tensor | None = None,
    ) -> Tensor:
        ids = _required_ids(self.multi_positive, caption_ids)
        if not (self.gather and is_distributed()):
            return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, self.chunk_size,
                                caption_ids=ids)  # fmt: skip
        image, text, scale = _upcast(image_features, text_features, logit_scale)
        bias = _upcast_bias(logit_bias, image)
        all_text = all_gather_with_grad(text, what="text_features ([b, D])")
        batch = image.shape[0]
        offset = dist.get_rank() * batch
        all_ids = _gathered_ids(ids, batch)
        local_ids = all_ids[offset : offset + batch] if all_ids is not None else None
        chunk = _resolve_chunk(self.chunk_size, all_text.shape[0])
        with _no_autocast(image.device):
            return _sigmoid(image, all_text, scale, bias, offset, chunk, local_ids, all_ids)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size!r}, gather={self.gather}, multi_positive={self.multi_positive}"
