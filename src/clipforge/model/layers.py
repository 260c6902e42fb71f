"""Layers both towers use: activations, multi-head attention, the MLP, the pre-LN residual block and the stack,
plus position-embedding resampling, and the named switch for the inference fast paths (:func:`fast_paths`)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's released CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation '{name}'; use 'quick_gelu' or 'gelu'")


_FAST_PATHS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "clipforge_fast_paths", default=os.environ.get("CLIPFORGE_FAST_PATHS", "1") != "0"
)


@contextlib.contextmanager
def fast_paths(enabled: bool) -> Iterator[None]:
    """Turn the towers' inference fast paths on or off inside the block (per thread / async context); the
    default is on, ``CLIPFORGE_FAST_PATHS=0`` makes it off. Off, inference runs the reference computation, the
    one training runs, line for line. The parity tests run both ways (``tests/test_fast_paths.py``)."""
    token = _FAST_PATHS.set(enabled)
    try:
        yield
    finally:
        _FAST_PATHS.reset(token)


def use_fast_paths(module: nn.Module) -> bool:
    """Whether ``module`` takes its inference fast paths (text: packed real tokens, no padding; ViT: patches as
    one matrix product, the last block pooled to the class token): the :func:`fast_paths` switch is on, the
    module is in eval mode and autograd is off. Training, and anything that needs gradients, runs the reference
    padded computation, so that a no-grad pass in train mode (the trainer's cached-feature pass) reproduces the
    gradient pass bit for bit: the fast paths give the same values only up to float32 rounding, and their index
    ops are slow to back-propagate on the CPU (profiled: scatter_add took 16% of a bf16 training step). Off
    while ``torch.compile`` traces: the fast paths depend on the data (see :mod:`clipforge.model.compile`)."""
    return (
        _FAST_PATHS.get()
        and not module.training
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v on [B, H, Lq, Dh] queries and [B, H, Lk, Dh] keys/values.

    ``causal``: query i sees keys ≤ i (Lq = Lk). ``mask``: boolean, broadcastable to [B, H, Lq, Lk], True = keep.
    ``dropout``: probability of dropping an attention weight (pass 0 outside training).
    Uses ``F.scaled_dot_product_attention`` except when training in bf16/fp16 on the CPU: there PyTorch's
    flash-attention backward is several times slower than plain matrix products at CLIP's sequence lengths
    (profiled: 33-46% of a bf16 training step of the small config), so that case is written out, with the
    softmax in float32.
    """
    reduced = q.dtype in (torch.bfloat16, torch.float16)
    if not (reduced and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        mask = _causal_mask(q.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return F.dropout(weights, dropout) @ v if dropout else weights @ v


@functools.lru_cache(maxsize=32)
def _causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """[L, L] boolean, True on and below the diagonal (read-only; shared by every call)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class _Group(NamedTuple):
    rows: torch.Tensor  # [n] sequences in this group (ascending)
    length: int  # the group's longest sequence
    gather: torch.Tensor  # [n * length] packed position of each padded slot (padding: the sequence's last)
    keep: torch.Tensor  # [t] the real slots of the padded [n * length] layout
    limit: torch.Tensor  # [n] position of each sequence's last token


class Packing:
    """Sequences of different lengths stored without padding: all sequences' tokens concatenated, [T, ...].

    Built from ``lengths`` [B] (one host sync). ``index`` [T] gives each packed token's place in the padded
    [B, L] grid (row-major, L = the longest length), ``last`` [B] the packed position of each sequence's last
    token. Position-wise layers (linear, MLP, LayerNorm) run on the packed tokens; attention pads them again,
    in groups of similar length (:meth:`split`/:meth:`merge`) so that short texts do not pay for long ones.
    Groups minimise padded slots + ``group_cost`` × groups.
    """

    def __init__(self, lengths: torch.Tensor, group_cost: int = 0) -> None:
        device, host = lengths.device, lengths.cpu()
        self.lengths, self.batch, self.length = lengths, host.shape[0], int(host.max())
        starts = host.cumsum(0) - host
        grid = torch.arange(self.length)
        self.index = (grid < host[:, None]).flatten().nonzero().squeeze(1).to(device)
        self.last = (starts + host - 1).to(device)
        self.groups: list[_Group] = []
        order = []
        for rows, length in length_groups(host, group_cost):
            positions = starts[rows][:, None] + grid[:length]  # [n, length]
            real = grid[:length] < host[rows][:, None]
            # Padding slots repeat the sequence's last token: never seen (they follow every real query of
            # their sequence), and finite, unlike uninitialised memory.
            last = (starts[rows] + host[rows] - 1)[:, None]
            gather = torch.where(real, positions, last).flatten()
            keep = real.flatten().nonzero().squeeze(1)
            self.groups.append(
                _Group(rows.to(device), length, gather.to(device), keep.to(device), host[rows] - 1)
            )
            order.append(positions[real])
        self.inverse = torch.argsort(torch.cat(order)).to(device) if len(self.groups) > 1 else None
        rows = torch.cat([group.rows for group in self.groups])
        self.row_inverse = torch.argsort(rows) if len(self.groups) > 1 else None

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Packed [T, C] -> per group [n, length, C] (after each sequence's end: copies of its last token)."""
        return [x.index_select(0, g.gather).view(len(g.rows), g.length, -1) for g in self.groups]

    def merge(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per group [n, length, C] -> packed [T, C] (padding dropped)."""
        flat = [part.flatten(0, 1).index_select(0, g.keep) for part, g in zip(parts, self.groups)]
        return flat[0] if self.inverse is None else torch.cat(flat).index_select(0, self.inverse)

    def merge_rows(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per group [n, C] -> [B, C] in the original sequence order."""
        return parts[0] if self.row_inverse is None else torch.cat(parts).index_select(0, self.row_inverse)


def length_groups(lengths: torch.Tensor, group_cost: int) -> list[tuple[torch.Tensor, int]]:
    """Rows grouped by length: [(row indices ascending, the group's longest length)], shortest group first.

    Minimises sum(rows × longest) + ``group_cost`` × groups over groups of consecutive lengths (dynamic
    programming over the distinct lengths of a CPU tensor). ``group_cost=0`` gives one group per length.
    """
    counts = torch.bincount(lengths).tolist()
    distinct = [length for length, count in enumerate(counts) if count]
    sizes = [counts[length] for length in distinct]
    best, cut = [0] * (len(distinct) + 1), [0] * (len(distinct) + 1)  # best[j]: cost of the j shortest
    for j in range(1, len(distinct) + 1):
        rows, best[j] = 0, -1
        for i in range(j, 0, -1):
            rows += sizes[i - 1]
            cost = best[i - 1] + rows * distinct[j - 1] + group_cost
            if best[j] < 0 or cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], len(distinct)
    while j > 0:
        bounds.append((distinct[cut[j] - 1] if cut[j] else 0, distinct[j - 1]))
        j = cut[j]
    return [
        (((lengths > low) & (lengths <= high)).nonzero().squeeze(1), high) for low, high in reversed(bounds)
    ]


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (the layout of ``nn.MultiheadAttention``).

    ``dropout`` drops attention weights in training mode (BERT's attention dropout; CLIP uses none).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        packing: Packing | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, L, W] -> [B, L, W], or packed sequences x [T, W] -> [T, W] (see :class:`Packing`).

        Packed sequences must be causal: padding then sits after every real token, where no query sees it.
        ``mask`` (padded input only): boolean, broadcastable to [B, H, L, L], True = the key is seen.
        """
        qkv = self.qkv(x)
        if packing is None:
            return self.out(self._attend(qkv, causal, mask))
        return self.out(packing.merge([self._attend(part, causal) for part in packing.split(qkv)]))

    def _attend(self, qkv: torch.Tensor, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, 3W] -> [B, L, W]."""
        batch, length = qkv.shape[:2]
        q, k, v = qkv.view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, Dh]
        dropout = self.dropout if self.training else 0.0
        out = attention(q, k, v, causal=causal, mask=mask, dropout=dropout)
        return out.transpose(1, 2).reshape(batch, length, -1)

    def forward_rows(
        self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False, packing: Packing | None = None
    ) -> torch.Tensor:
        """The output at one position per sequence, [B, W]: ``forward(...)`` read at ``rows`` only.

        Padded x [B, L, W]: ``rows`` [B] are positions (with ``causal``, row b sees positions ≤ rows[b]).
        Packed x [T, W]: the rows are each sequence's last token, which sees its whole sequence. Keys and values
        come from every position, the query from the pooled one only.
        """
        width = x.shape[-1]
        weight, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, weight[width:], bias[width:])
        if packing is None:
            query_in = x[torch.arange(x.shape[0], device=x.device), rows]
            q = F.linear(query_in, weight[:width], bias[:width])
            return self.out(self._attend_one(q, kv, rows if causal else None))
        q = F.linear(x[packing.last], weight[:width], bias[:width])  # [B, W]
        parts = [
            self._attend_one(q[g.rows], part, g.limit.to(x.device))
            for g, part in zip(packing.groups, packing.split(kv))
        ]
        return self.out(packing.merge_rows(parts))

    def _attend_one(self, q: torch.Tensor, kv: torch.Tensor, limit: torch.Tensor | None) -> torch.Tensor:
        """One query per sequence: q [B, W], kv [B, L, 2W] -> [B, W]; ``limit`` [B]: last key seen."""
        batch, length = kv.shape[:2]
        k, v = kv.view(batch, length, 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, Dh]
        mask = None
        if limit is not None:
            mask = (torch.arange(length, device=kv.device) <= limit[:, None]).view(batch, 1, 1, length)
        return attention(q.view(batch, self.heads, 1, -1), k, v, mask=mask).reshape(batch, -1)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor, causal: bool = False, packing: Packing | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, packing=packing)
        return x + self.mlp(self.norm2(x))

    def forward_rows(
        self, x: torch.Tensor, rows: torch.Tensor, causal: bool = False, packing: Packing | None = None
    ) -> torch.Tensor:
        """The block's output at the pooled rows only, [B, W] (see :meth:`Attention.forward_rows`): the
        output projection and the MLP run on B rows instead of every token."""
        if packing is None:
            picked = x[torch.arange(x.shape[0], device=x.device), rows]
        else:
            picked = x[packing.last]
        picked = picked + self.attn.forward_rows(self.norm1(x), rows, causal=causal, packing=packing)
        return picked + self.mlp(self.norm2(picked))


class Transformer(nn.Module):
    """A stack of residual blocks on [B, L, W] tensors (or packed causal sequences), with optional gradient
    checkpointing per block."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str) -> None:
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, activation) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        rows: torch.Tensor | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """x [B, L, W] -> [B, L, W] (packed: [T, W] -> [T, W]).

        ``rows`` [B]: return only each sequence's output at that position, [B, W] (packed: pass
        ``packing.last``). A pooled model needs no other output of the last block, so that block computes
        keys and values everywhere and everything else for the pooled rows only; the result is the same.
        """
        if packing is not None and not causal:
            raise ValueError("packed sequences need causal attention (padding must come after every query)")
        blocks = list(self.blocks)
        last = blocks.pop() if rows is not None and blocks else None
        for block in blocks:
            x = self._run(block, x, causal, packing)
        if last is not None:
            return self._run(last.forward_rows, x, rows, causal, packing)
        if rows is None:
            return x
        return x[rows] if packing is not None else x[torch.arange(x.shape[0], device=x.device), rows]

    def _run(self, fn, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def init_weights(self) -> None:
        """OpenAI's initialisation: std width^-0.5 for attention inputs, scaled by depth for output projections."""
        width, layers = self.width, len(self.blocks)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.zeros_(block.attn.out.bias)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)


def resample_grid_pos_embed(pos_embed: torch.Tensor, new_grid: int, extra_tokens: int = 1) -> torch.Tensor:
    """Bicubically resample a [extra + g*g, W] position embedding to [extra + new_grid**2, W].

    The first ``extra_tokens`` rows (the class token / pooled token) are kept as they are.
    """
    extra, grid_tokens = pos_embed[:extra_tokens], pos_embed[extra_tokens:]
    old_grid = math.isqrt(grid_tokens.shape[0])
    if old_grid * old_grid != grid_tokens.shape[0]:
        raise ValueError(f"position embedding of {grid_tokens.shape[0]} grid tokens is not a square grid")
    if old_grid == new_grid:
        return pos_embed
    width = grid_tokens.shape[1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=0)


def resample_sequence_pos_embed(pos_embed: torch.Tensor, new_length: int) -> torch.Tensor:
    """Resize a [L, W] text position embedding to [new_length, W].

    Shorter: keep the first rows (positions keep their meaning under a causal mask). Longer: linear interpolation.
    """
    length = pos_embed.shape[0]
    if new_length <= length:
        return pos_embed[:new_length].clone()
    seq = pos_embed.t().unsqueeze(0).float()  # [1, W, L]
    seq = F.interpolate(seq, size=new_length, mode="linear", align_corners=True)
    return seq.squeeze(0).t().contiguous().to(pos_embed.dtype)
