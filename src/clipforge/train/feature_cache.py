"""Features of a locked tower computed once per distinct input and reused across steps and epochs (LiT): a cache
keyed by the content of each input row, bounded in memory, counting hits and misses."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import nn

ENTRY_OVERHEAD = (
    200  # bytes per entry besides the feature values: key, tensor object, dict slot (approximate)
)


def row_keys(inputs: torch.Tensor) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each row of ``inputs`` [B, ...] (its dtype, shape and bytes)."""
    flat = inputs.detach().reshape(inputs.shape[0], -1).contiguous().cpu()
    raw = flat.view(torch.uint8).numpy()  # [B, bytes per row]
    prefix = f"{inputs.dtype}{tuple(inputs.shape[1:])}".encode()
    return [hashlib.blake2b(prefix + row.tobytes(), digest_size=16).digest() for row in raw]


class FeatureCache:
    """``cache(inputs, encoder)`` -> ``encoder(inputs)`` [B, W], running the encoder only on rows not seen before.

    Rows are keyed by :func:`row_keys`, so equal token rows (texts) or equal image tensors share one entry, also
    within a batch. Valid only for a deterministic encoder: locked, in eval mode (the tower checks both). Least
    recently used entries are evicted past ``max_bytes``. ``hits`` counts rows served without running the
    encoder, ``misses`` the distinct rows it ran on.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0
        self._entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __call__(self, inputs: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        keys = row_keys(inputs)
        rows: list[torch.Tensor | None] = []
        for key in keys:
            row = self._entries.get(key)
            if row is not None:
                self._entries.move_to_end(key)
            rows.append(row)
        missing: dict[bytes, list[int]] = {}
        for index, (key, row) in enumerate(zip(keys, rows)):
            if row is None:
                missing.setdefault(key, []).append(index)
        if missing:
            first = torch.tensor([indices[0] for indices in missing.values()], device=inputs.device)
            computed = encoder(inputs.index_select(0, first))
            for (key, indices), row in zip(missing.items(), computed):
                row = row.clone()  # its own storage: a view would keep the whole batch alive
                self._store(key, row)
                for index in indices:
                    rows[index] = row
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if not rows:
            return encoder(inputs)
        return torch.stack(rows)  # type: ignore[arg-type]

    def _store(self, key: bytes, row: torch.Tensor) -> None:
        size = row.numel() * row.element_size() + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        self._entries[key] = row
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size() + ENTRY_OVERHEAD
            self.evicted += 1

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "entries": len(self), "bytes": self.bytes,
                "evicted": self.evicted}  # fmt: skip
