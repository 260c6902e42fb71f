"""The backward pass every chunked loss shares: logits = s · Q Kᵀ are never held whole, so the gradients of
Q, K and s are accumulated block by block from the rows of dloss/dlogits."""

from __future__ import annotations

import torch
from torch import Tensor


class BlockGradients:
    """Accumulates the gradients of queries Q [n, D], keys K [N, D] and the scale s from blocks of
    G = dloss/dlogits (rows ``start : start + len(G)``), for logits = s · Q Kᵀ:

    dQ = s · G K,  dK = s · Gᵀ Q,  ds = Σ_ij G_ij q_i·k_j = Σ_i q_i·(G K)_i (reusing G K, in float64).

    Only the gradients autograd asks for (``needs``: queries, keys, scale) are computed.
    """

    def __init__(self, queries: Tensor, keys: Tensor, scale: Tensor, needs: tuple[bool, bool, bool]) -> None:
        self.queries, self.keys, self.scale = queries, keys, scale
        self.need_queries, self.need_keys, self.need_scale = needs
        self.grad_queries = torch.empty_like(queries) if self.need_queries else None
        self.grad_keys = torch.zeros_like(keys) if self.need_keys else None
        self.grad_scale = torch.zeros((), dtype=torch.float64, device=scale.device)

    def add(self, block: Tensor, start: int) -> None:
        """Add one block of dloss/dlogits, rows ``start : start + block.shape[0]`` of the queries."""
        q = self.queries[start : start + block.shape[0]]
        if self.grad_keys is not None:
            self.grad_keys.addmm_(block.T, q)
        if self.need_queries or self.need_scale:
            g_keys = block @ self.keys  # dloss/dq / s
            if self.grad_queries is not None:
                self.grad_queries[start : start + block.shape[0]] = g_keys * self.scale
            self.grad_scale += (q.double() * g_keys.double()).sum()

    def result(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """(dQ, dK, ds), None where not asked for."""
        if self.grad_keys is not None:
            self.grad_keys.mul_(self.scale)
        grad_scale = self.grad_scale.to(self.scale.dtype) if self.need_scale else None
        return self.grad_queries, self.grad_keys, grad_scale
