"""Tensor parallelism for the reference model (torch.distributed; gloo on CPU, NCCL on GPUs).

The split follows DeepSeek-V3's reference: attention heads, MLP / shared-expert intermediate size and the vocabulary
are split across ranks (column-parallel in, row-parallel out with an all-reduce); routed experts are divided
between ranks; the lightning indexer, the norms, the router and the KV latents are replicated, so every rank
computes the same top-k selections and traces them (rank in the trace).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world() -> tuple[int, int]:
    """(world_size, rank) of the default process group, (1, 0) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world()[0] > 1:
        dist.all_reduce(x)
    return x


def split(n: int, what: str) -> int:
    ws = world()[0]
    if n % ws:
        raise ValueError(f"{what} ({n}) must be divisible by the tensor-parallel world size ({ws})")
    return n // ws


class ColumnParallelLinear(nn.Linear):
    """Output features split across ranks (no communication)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(d_in, split(d_out, "output features"), bias=False)


class RowParallelLinear(nn.Linear):
    """Input features split across ranks; partial outputs summed with an all-reduce (float32)."""

    def __init__(self, d_in: int, d_out: int, reduce: bool = True) -> None:
        super().__init__(split(d_in, "input features"), d_out, bias=False)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce and world()[0] > 1:
            y = all_reduce(y.float()).to(x.dtype)
        return y


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        ws, rank = world()
        self.part = split(vocab, "vocab_size")
        self.start = rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if world()[0] == 1:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        outside = (local < 0) | (local >= self.part)
        y = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return all_reduce(y)


class ParallelHead(nn.Linear):
    """Vocabulary split across ranks; logits gathered so every rank samples the same token."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__(dim, split(vocab, "vocab_size"), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        ws = world()[0]
        if ws == 1:
            return y
        parts = [torch.empty_like(y) for _ in range(ws)]
        dist.all_gather(parts, y.contiguous())
        return torch.cat(parts, -1)
