"""Paged KV cache: per-layer physical block pools, a block table per sequence, and a simple allocator.

Every layer stores, per token, what DeepSeek-V3.2 caches: the MLA latent (kv_lora_rank), the decoupled RoPE key
(qk_rope_head_dim) and the lightning indexer's key (index_head_dim). Token ``pos`` of a sequence lives in physical
block ``block_table[seq][pos // block_size]`` at offset ``pos % block_size``. The allocator here is deliberately
simple (a free list, no sharing); the serving engine builds reference counting and prefix caching on the same
interface (``BlockAllocator`` is what it replaces).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import ModelArgs


class OutOfBlocks(RuntimeError):
    """The KV pool has no free block left."""


@dataclass
class BlockAllocator:
    num_blocks: int
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        return self.free.pop()

    def release(self, block: int) -> None:
        self.free.append(block)

    @property
    def num_free(self) -> int:
        return len(self.free)


class PagedKVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, allocator: BlockAllocator | None = None) -> None:
        self.args = args
        self.block_size = args.kv_block_size
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        n = num_blocks * self.block_size
        L = args.n_layers
        self.latent = torch.zeros(L, n, args.kv_lora_rank, device=device, dtype=dtype)
        self.rope = torch.zeros(L, n, args.qk_rope_head_dim, device=device, dtype=dtype)
        self.index_k = torch.zeros(L, n, args.index_head_dim, device=device, dtype=dtype)
        self.allocator = allocator or BlockAllocator(num_blocks)
        self.tables: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    # ------------------------------------------------------------------ sequences
    def add_sequence(self, seq_id: object, shared_blocks: list[int] | None = None) -> None:
        """Start a sequence; ``shared_blocks`` are already-filled full blocks it reuses (a prefix-cache hit,
        referenced by the caller), so its length starts after them."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id!r} already has a block table")
        self.tables[seq_id] = list(shared_blocks or [])
        self.lengths[seq_id] = len(self.tables[seq_id]) * self.block_size

    def reserve(self, seq_id: object, n_tokens: int) -> None:
        """Make room for ``n_tokens`` more tokens (allocating blocks as needed)."""
        table = self.tables[seq_id]
        need = -(-(self.lengths[seq_id] + n_tokens) // self.block_size)
        while len(table) < need:
            table.append(self.allocator.allocate())

    def advance(self, seq_id: object, n_tokens: int) -> None:
        self.lengths[seq_id] += n_tokens

    def free(self, seq_id: object) -> None:
        """Release the sequence's blocks (the allocator decides what a released block becomes)."""
        for b in self.tables.pop(seq_id, []):
            self.allocator.release(b)
        self.lengths.pop(seq_id, None)

    def block_table(self, seq_ids: list, width: int | None = None) -> torch.Tensor:
        """[B, width] physical block ids (-1 padded), on the cache's device."""
        width = width or max(1, max(len(self.tables[s]) for s in seq_ids))
        rows = [self.tables[s] + [-1] * (width - len(self.tables[s])) for s in seq_ids]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ slots
    def slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache rows of token ``positions`` [B, P] of the sequences whose block tables are ``table``."""
        blk = torch.div(positions, self.block_size, rounding_mode="floor")
        phys = table.gather(1, blk.clamp(min=0, max=table.shape[1] - 1))
        return phys * self.block_size + positions % self.block_size

    def context(self, store: torch.Tensor, table: torch.Tensor, T: int) -> torch.Tensor:
        """[B, T, D] rows of positions 0..T-1 of every sequence in ``table``, from ``store`` (one layer's
        ``latent``, ``rope`` or ``index_k``), gathered a whole block at a time: a block's rows are contiguous in the
        cache, so this moves block-sized runs instead of indexing T rows one by one (what the indexer reads every
        step). Rows past a sequence's length come from its padding (-1 -> block 0) and must be masked by the
        caller, as the causal mask does."""
        n_blocks = -(-T // self.block_size)
        blocks = store.view(self.num_blocks, self.block_size, store.shape[-1])[table[:, :n_blocks].clamp(min=0)]
        return blocks.flatten(1, 2)[:, :T]

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, rope: torch.Tensor,
              index_k: torch.Tensor) -> None:
        flat = slots.reshape(-1)
        self.latent[layer, flat] = latent.reshape(-1, latent.shape[-1]).to(self.latent.dtype)
        self.rope[layer, flat] = rope.reshape(-1, rope.shape[-1]).to(self.rope.dtype)
        self.index_k[layer, flat] = index_k.reshape(-1, index_k.shape[-1]).to(self.index_k.dtype)
