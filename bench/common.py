"""Small pieces the benchmark scripts share: writing a result file, the size of an output folder, the reference
model as the GPU benches run it, and a paged KV cache filled to a context length (decode cost does not depend on
the cached values)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_report(path: str | None, report: Any) -> None:
    """Write a benchmark's JSON result (creating its folder); nothing when no path was asked for."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def dir_bytes(path: str) -> int:
    """Bytes of all files below ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def bench_model(preset_name: str, device: str) -> tuple[Any, Any, Any]:
    """(model args, model, dtype): the reference model of ``preset_name`` with seed 0, in bf16 on a GPU (as served)
    and float32 on the CPU. (torch is imported here: the CPU-only scripts stay light.)"""
    import torch

    from dsa_otel.model.config import preset
    from dsa_otel.model.dsa import build_model

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    args = preset(preset_name)
    torch.manual_seed(0)
    return args, build_model(args, device=device, dtype=dtype), dtype


def filled_cache(args, B: int, T: int, steps: int, device: str, dtype) -> tuple[Any, list[int]]:
    """A PagedKVCache with B sequences of T cached tokens each (random latents, RoPE keys and index keys) and room
    for ``steps`` more tokens; sequence ids 0..B-1. (torch is imported here: the CPU-only scripts stay light.)"""
    import torch

    from dsa_otel.model.kv import PagedKVCache

    blocks_per_seq = -(-(T + steps + 1) // args.kv_block_size)
    cache = PagedKVCache(args, B * blocks_per_seq, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(0)
    for t in (cache.latent, cache.rope, cache.index_k):
        t.copy_(torch.randn(t.shape, generator=g, device=device, dtype=torch.float32).to(dtype))
    seqs = list(range(B))
    for s in seqs:
        cache.add_sequence(s)
        cache.reserve(s, T + steps + 1)
        cache.advance(s, T)
    return cache, seqs
