"""Caption identity and positives: which keys are each query's positives (its own pair, or with
``multi_positive`` every pair whose caption is identical), shared by the softmax and sigmoid losses."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from clipforge.distributed import all_gather_with_grad

# Two polynomial hashes modulo primes below 2^31: every product and sum stays far inside int64 on any device.
_HASH_PRIMES = (2_147_483_629, 2_147_483_587)
_HASH_BASES = (1_000_003, 911_382_323)


@functools.lru_cache(maxsize=32)
def _hash_powers(length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    powers = []
    for prime, base in zip(_HASH_PRIMES, _HASH_BASES):
        values, value = [], 1
        for _ in range(length):
            values.append(value)
            value = value * base % prime
        powers.append(torch.tensor(values, dtype=torch.int64, device=device))
    return powers[0], powers[1]


def caption_ids(tokens: Tensor) -> Tensor:
    """Token rows [B, L] -> [B] int64, equal for identical rows: a 62-bit hash (two polynomial hashes modulo
    primes near 2^31). Distinct rows collide with probability about L / 2^31 squared per pair (~1e-15 at L = 77)."""
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {list(tokens.shape)}")
    first, second = _hash_powers(tokens.shape[1], tokens.device)
    tokens = tokens.long()
    low = (tokens * second % _HASH_PRIMES[1]).sum(dim=1) % _HASH_PRIMES[1]
    high = (tokens * first % _HASH_PRIMES[0]).sum(dim=1) % _HASH_PRIMES[0]
    return high * 2**31 + low


def _checked_ids(caption_ids: Tensor | None, batch: int) -> Tensor | None:
    if caption_ids is None:
        return None
    if caption_ids.shape != (batch,) or caption_ids.dtype.is_floating_point:
        raise ValueError(
            f"caption_ids must be integers of shape [{batch}] (one per pair), got {caption_ids.dtype} "
            f"{list(caption_ids.shape)}"
        )
    return caption_ids.long()


def _unless_unique(ids: Tensor | None) -> Tensor | None:
    """``ids``, or None when no two are equal: then the plain paired loss is the same loss, bit for bit."""
    if ids is None or torch.unique(ids).numel() == ids.numel():
        return None
    return ids


def _gathered_ids(caption_ids: Tensor | None, batch: int) -> Tensor | None:
    """Every rank's caption ids in rank order (None when absent or all distinct: the same answer on every rank)."""
    ids = _checked_ids(caption_ids, batch)
    if ids is None:
        return None
    return _unless_unique(all_gather_with_grad(ids, what="caption_ids ([b])"))


def _required_ids(multi_positive: bool, caption_ids: Tensor | None) -> Tensor | None:
    if not multi_positive:
        return None
    if caption_ids is None:
        raise ValueError("multi_positive needs caption_ids (one per pair, e.g. caption_ids(tokens))")
    return caption_ids


class _Positives:
    """Which keys are each query's positives: key ``offset + i`` for query i (its own pair), or, with caption ids,
    every key whose id equals the query's (its own pair included, so every query has at least one)."""

    def __init__(self, offset: int, query_ids: Tensor | None = None, key_ids: Tensor | None = None) -> None:
        self.offset = offset
        self.query_ids, self.key_ids = query_ids, key_ids
        self.diagonal = query_ids is None
        if query_ids is not None:
            assert key_ids is not None
            sorted_keys = key_ids.sort().values
            counts = torch.searchsorted(sorted_keys, query_ids, right=True) - torch.searchsorted(
                sorted_keys, query_ids
            )
            self.query_counts = counts.clamp_min(1)  # [n] positives per query

    def diagonal_index(self, block: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """(row indices, column indices) of the positives of rows ``start:start+len(block)``."""
        rows = torch.arange(block.shape[0], device=block.device)
        return rows, rows + start + self.offset

    def mask(self, start: int, stop: int) -> Tensor:
        """[stop - start, N] bool: True where the key is a positive of the query."""
        assert self.query_ids is not None and self.key_ids is not None
        return self.query_ids[start:stop, None] == self.key_ids[None, :]

    def mean_logit(self, block: Tensor, start: int) -> Tensor:
        """Mean logit over each block row's positives, [rows] (exactly the paired logit for a single positive)."""
        if self.diagonal:
            return block[self.diagonal_index(block, start)]
        stop = start + block.shape[0]
        total = torch.where(self.mask(start, stop), block, 0.0).sum(dim=1)
        return total / self.query_counts[start:stop].to(block.dtype)

    def subtract_targets(self, block: Tensor, start: int, weight: float) -> None:
        """``block -= weight × (uniform distribution over each row's positives)``, in place."""
        if self.diagonal:
            block[self.diagonal_index(block, start)] -= weight
            return
        stop = start + block.shape[0]
        block.sub_(self.mask(start, stop) * (weight / self.query_counts[start:stop, None].to(block.dtype)))

    def dense(self, rows: int, cols: int, device: torch.device) -> Tensor:
        """The whole [rows, cols] positive mask (for the unchunked reference paths)."""
        if self.diagonal:
            index = torch.arange(rows, device=device)
            mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
            mask[index, index + self.offset] = True
            return mask
        return self.mask(0, rows)
