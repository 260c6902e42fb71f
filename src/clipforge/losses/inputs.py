"""What both losses do with their inputs: features checked and cast up to float32, autocast kept off, and the
chunk size (rows of logits held at once) resolved."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

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


def _no_autocast(device: torch.device):
    """Keep the loss's matmuls in the features' (upcast) dtype when the caller runs under autocast."""
    return torch.autocast(device_type=device.type, enabled=False)
