"""Synthetic DSA top-k selections with a realistic shape, for demos, tests and benchmarks.

Each selection mixes attention-sink tokens (the first few positions), a recent window, and a per-layer set of
"heavy hitter" positions that drift slowly between steps, which is what indexer top-k traces look like: strong
recency, a stable long-range working set, and per-layer differences. Fully vectorised and seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SyntheticWorkload:
    n_requests: int = 8
    batch_size: int = 4
    prompt_len: int = 1024
    decode_steps: int = 8
    n_layers: int = 4
    topk: int = 256
    sink: int = 4
    recent_fraction: float = 0.25
    seed: int = 0
    device: str = "cpu"


def topk_for_step(w: SyntheticWorkload, seq_lens: torch.Tensor, layer: int, step: int) -> torch.Tensor:
    """[B, K] int64 selections for one layer of one step; -1 pads contexts shorter than K."""
    B = seq_lens.shape[0]
    K = w.topk
    g = torch.Generator(device="cpu").manual_seed(w.seed * 1_000_003 + layer * 7919 + step // 4)
    seq = seq_lens.to("cpu").long()
    # scores: recency bump + sinks + a fixed random "importance" per (layer, position) bucket
    L = int(seq.max())
    pos = torch.arange(L)
    # clustered importance: whole 16-token spans matter together, plus token-level noise
    importance = torch.rand(L // 16 + 1, generator=g).repeat_interleave(16)[:L] ** 4 + 0.2 * torch.rand(L, generator=g)
    score = importance.unsqueeze(0).expand(B, L).clone()
    recent = (seq.unsqueeze(1) - 1 - pos.unsqueeze(0)).clamp(min=0).float()
    score += w.recent_fraction * 4.0 * torch.exp(-recent / max(1.0, K * w.recent_fraction))
    score[:, : w.sink] += 10.0
    score[pos.unsqueeze(0).expand(B, L) >= seq.unsqueeze(1)] = float("-inf")
    k = min(K, L)
    vals, idx = torch.topk(score, k, dim=1)
    idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    if k < K:
        idx = torch.cat([idx, torch.full((B, K - k), -1, dtype=idx.dtype)], 1)
    return idx.to(w.device)
