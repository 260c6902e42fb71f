"""CLIP's symmetric contrastive (InfoNCE) loss: exact, across processes, and in bounded memory.

``chunk_size=None`` builds the full B×B logits matrix (O(B²) memory). An integer (or ``"auto"``)
computes the same loss and the same gradients block by block, never holding more than ``chunk_size`` rows of
logits: extra memory O(chunk_size × B + B × D) instead of O(B²).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from clipforge.distributed import all_gather_with_grad, is_distributed

ChunkSize = int | Literal["auto"] | None

# Float32 logits working set per chunk row: the block plus up to two temporaries of the same size.
_BLOCKS_PER_CHUNK = 3
_DEFAULT_BUDGET = 256 * 2**20
# Blocks taller than this ran no faster on a 2-core CPU (B = 8k-32k, D = 512) and only cost memory.
_MAX_AUTO_ROWS = 256


def auto_chunk_size(batch: int, budget_bytes: int = _DEFAULT_BUDGET, max_rows: int = _MAX_AUTO_ROWS) -> int:
    """Rows per chunk: at most ``max_rows``, and few enough that the float32 working set of a block of logits
    against ``batch`` keys stays within ``budget_bytes``. Always at least 1."""
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    return max(1, min(batch, max_rows, budget_bytes // (_BLOCKS_PER_CHUNK * 4 * batch)))


def _resolve_chunk(chunk_size: ChunkSize, num_keys: int) -> int | None:
    if chunk_size is None:
        return None
    if chunk_size == "auto":
        return auto_chunk_size(num_keys)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, 'auto' or None, got {chunk_size!r}")
    return chunk_size


def _diagonal(block: Tensor, start: int, offset: int) -> tuple[Tensor, Tensor]:
    """(row indices, column indices) of the positives of rows ``start:start+len(block)``."""
    rows = torch.arange(block.shape[0], device=block.device)
    return rows, rows + start + offset


class _ChunkedInfoNCE(torch.autograd.Function):
    """mean_i CE(s · q_i Kᵀ, offset + i) for queries Q [n, D], keys K [N, D], scale s; one direction."""

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, offset: int, chunk: int) -> Tensor:
        n = queries.shape[0]
        lse = queries.new_empty(n)
        positive = queries.new_empty(n)
        for start in range(0, n, chunk):
            block = (scale * queries[start : start + chunk]) @ keys.T
            rows, cols = _diagonal(block, start, offset)
            positive[start : start + chunk] = block[rows, cols]
            lse[start : start + chunk] = torch.logsumexp(block, dim=1)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.offset, ctx.chunk = offset, chunk
        return (lse - positive).mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        queries, keys, scale, lse = ctx.saved_tensors
        need_queries, need_keys, need_scale = ctx.needs_input_grad[:3]
        n, chunk, offset = queries.shape[0], ctx.chunk, ctx.offset
        weight = grad_loss / n
        grad_queries = torch.empty_like(queries) if need_queries else None
        grad_keys = torch.zeros_like(keys) if need_keys else None
        grad_scale = torch.zeros((), dtype=torch.float64, device=scale.device)
        for start in range(0, n, chunk):
            q = queries[start : start + chunk]
            # dCE/dlogits = softmax - onehot, rebuilt in place in the recomputed logits block.
            block = (scale * q) @ keys.T
            block.sub_(lse[start : start + chunk, None]).exp_()
            rows, cols = _diagonal(block, start, offset)
            block[rows, cols] -= 1.0
            block.mul_(weight)
            if grad_keys is not None:
                grad_keys.addmm_(block.T, q)
            if need_queries or need_scale:
                g_keys = block @ keys  # dloss/dq / s
                if grad_queries is not None:
                    grad_queries[start : start + chunk] = g_keys * scale
                # dloss/ds = Σ_ij G_ij q_i·k_j = Σ_i q_i·(G K)_i: reuses G K instead of keeping the raw block.
                grad_scale += (q.double() * g_keys.double()).sum()
        if grad_keys is not None:
            grad_keys.mul_(scale)
        return grad_queries, grad_keys, grad_scale.to(scale.dtype) if need_scale else None, None, None


class _ChunkedSymmetricInfoNCE(torch.autograd.Function):
    """(CE(s X Yᵀ, arange) + CE(s Y Xᵀ, arange)) / 2 for X, Y [B, D] in one pass over row blocks of X Yᵀ.

    Row log-sum-exps give the image→text term, running column log-sum-exps the text→image term, so every
    block is multiplied once forward and once backward (half the work of two one-direction passes).
    """

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, chunk: int) -> Tensor:
        batch = image.shape[0]
        row_lse = image.new_empty(batch)
        positive = image.new_empty(batch)
        col_max = image.new_full((batch,), float("-inf"))
        col_sum = image.new_zeros(batch)
        for start in range(0, batch, chunk):
            block = (scale * image[start : start + chunk]) @ text.T
            rows, cols = _diagonal(block, start, 0)
            positive[start : start + chunk] = block[rows, cols]
            row_lse[start : start + chunk] = torch.logsumexp(block, dim=1)
            # Online log-sum-exp down the columns: rescale the running sum to the new running max.
            new_max = torch.maximum(col_max, block.amax(dim=0))
            col_sum.mul_(torch.exp(col_max - new_max)).add_(block.sub_(new_max).exp_().sum(dim=0))
            col_max = new_max
        col_lse = col_max + torch.log(col_sum)
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.chunk = chunk
        return ((row_lse - positive).mean() + (col_lse - positive).mean()) / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        need_image, need_text, need_scale = ctx.needs_input_grad[:3]
        batch, chunk = image.shape[0], ctx.chunk
        weight = grad_loss / (2 * batch)
        grad_image = torch.empty_like(image) if need_image else None
        grad_text = torch.zeros_like(text) if need_text else None
        grad_scale = torch.zeros((), dtype=torch.float64, device=scale.device)
        for start in range(0, batch, chunk):
            x = image[start : start + chunk]
            # Row softmax + column softmax - 2·onehot: the gradient of both directions for this block.
            block = (scale * x) @ text.T
            col_softmax = torch.sub(block, col_lse).exp_()
            block.sub_(row_lse[start : start + chunk, None]).exp_().add_(col_softmax)
            del col_softmax
            rows, cols = _diagonal(block, start, 0)
            block[rows, cols] -= 2.0
            block.mul_(weight)
            if grad_text is not None:
                grad_text.addmm_(block.T, x)
            if need_image or need_scale:
                g_text = block @ text
                if grad_image is not None:
                    grad_image[start : start + chunk] = g_text * scale
                grad_scale += (x.double() * g_text.double()).sum()
        if grad_text is not None:
            grad_text.mul_(scale)
        return grad_image, grad_text, grad_scale.to(scale.dtype) if need_scale else None, None


def _one_direction(queries: Tensor, keys: Tensor, scale: Tensor, offset: int, chunk: int | None) -> Tensor:
    """Mean over query rows i of CE(s · q_i Kᵀ) with the positive at key ``offset + i``."""
    if chunk is None:
        labels = torch.arange(queries.shape[0], device=queries.device) + offset
        return F.cross_entropy(scale * queries @ keys.T, labels)
    return _ChunkedInfoNCE.apply(queries, keys, scale, offset, chunk)


def _no_autocast(device: torch.device):
    """Keep the loss's matmuls in the features' (upcast) dtype when the caller runs under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)


def _upcast(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float):
    """Check shapes; cast features and scale to float32 (float64 stays float64)."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "image_features and text_features must both be [batch, dim] with the same shape, got "
            f"{list(image_features.shape)} and {list(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("the contrastive loss needs at least one (image, text) pair, got an empty batch")
    dtype = torch.promote_types(torch.promote_types(image_features.dtype, text_features.dtype), torch.float32)
    scale = torch.as_tensor(logit_scale, device=image_features.device)
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be a scalar, got shape {list(scale.shape)}")
    return image_features.to(dtype), text_features.to(dtype), scale.to(dtype).reshape(())


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    chunk_size: ChunkSize = None,
) -> Tensor:
    """CLIP's symmetric InfoNCE loss for one process.

    image_features, text_features: [B, D], L2-normalised, row i of each is a positive pair.
    logit_scale: scalar, already exponentiated (1 / temperature).
    Returns (CE(s X Yᵀ, arange(B)) + CE(s Y Xᵀ, arange(B))) / 2 as a scalar, computed in float32 whatever the
    input dtype and even under autocast (float64 input stays float64). ``chunk_size`` (int or ``"auto"``)
    gives the same value and gradients in O(chunk_size × B) extra memory; None builds the B×B logits.
    """
    image, text, scale = _upcast(image_features, text_features, logit_scale)
    chunk = _resolve_chunk(chunk_size, image.shape[0])
    with _no_autocast(image.device):
        if chunk is None:
            logits_per_image = scale * image @ text.T
            labels = torch.arange(image.shape[0], device=image.device)
            return (
                F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)
            ) / 2
        return _ChunkedSymmetricInfoNCE.apply(image, text, scale, chunk)


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss, gathered across ranks when a process group is initialised.

    forward(image_features [b, D], text_features [b, D], logit_scale scalar) -> scalar, float32 whatever the
    input dtype (bf16/fp16 are cast up; float64 stays float64).

    With a process group of W ranks and ``gather=True``, each rank's local rows are scored against the
    features of all W·b pairs (gathered with gradients) and the loss is the mean over its local rows. The
    per-rank values average to the loss of the whole global batch, and under DistributedDataParallel (which
    averages gradients) every parameter gets exactly the single-process gradient of the global batch.
    ``gather=False`` (or no process group) scores each rank's batch on its own. Local batch sizes must be
    equal across ranks. ``chunk_size``: see :func:`contrastive_loss`.
    """

    def __init__(self, chunk_size: ChunkSize = None, gather: bool = True) -> None:
        super().__init__()
        _resolve_chunk(chunk_size, 1)  # validate early
        self.chunk_size = chunk_size
        self.gather = gather

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float) -> Tensor:
        if not (self.gather and is_distributed()):
            return contrastive_loss(image_features, text_features, logit_scale, self.chunk_size)
        image, text, scale = _upcast(image_features, text_features, logit_scale)
        # One collective for both towers: gather [b, 2D], then split.
        gathered = all_gather_with_grad(
            torch.cat([image, text], dim=1), what="[image_features | text_features] ([b, 2 * D])"
        )
        all_image, all_text = gathered.split(image.shape[1], dim=1)
        offset = dist.get_rank() * image.shape[0]
        chunk = _resolve_chunk(self.chunk_size, gathered.shape[0])
        with _no_autocast(image.device):
            image_to_text = _one_direction(image, all_text, scale, offset, chunk)
            text_to_image = _one_direction(text, all_image, scale, offset, chunk)
            return (image_to_text + text_to_image) / 2

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size!r}, gather={self.gather}"
