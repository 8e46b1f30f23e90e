"""Reference DSA model on the GPU: decode tokens/s of truly sparse attention vs dense-then-mask, and the longest
prefill that fits (sparse chunked vs dense unchunked, the seed's way).

Decode: the `small` preset in bf16; each sequence's paged KV cache is filled with random latents / RoPE keys /
index keys up to the context length (decode cost does not depend on the values), then both attention modes decode
the same steps, interleaved, as eager forwards (launch-bound: ~19 ms of host work per step on the H100 VM) and as
CUDA-graph replays (model/graphs.py: the GPU's own time, what sparse vs dense changes). Prefill: real forward passes of growing prompts until one runs out of memory.

    python bench/model_decode.py --out bench/results/model-decode-h100.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import filled_cache, write_report  # noqa: E402

from dsa_otel.model.config import preset  # noqa: E402
from dsa_otel.model.dsa import build_model  # noqa: E402
from dsa_otel.model.graphs import DecodeGraph  # noqa: E402
from dsa_otel.model.kv import PagedKVCache  # noqa: E402


def decode_ms(model, cache, seqs, steps: int, attn: str, graph: DecodeGraph | None = None) -> list[float]:
    """Per-step wall time of ``steps`` decode steps (eager, or replaying ``graph``), each ended by a sync."""
    times = []
    B = len(seqs)
    tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    for _ in range(steps):
        for s in seqs:
            cache.reserve(s, 1)
        start = torch.tensor([cache.lengths[s] for s in seqs], device="cuda")
        table = cache.block_table(seqs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if graph is None:
            model(tok, start, cache, table, attn=attn, last_only=True)
        else:
            graph(tok, start, table)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def longest_prefill(model, args, dtype, lengths: list[int], attn: str, chunk: int) -> list[dict]:
    rows = []
    for L in lengths:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = None
        try:
            cache = PagedKVCache(args, -(-L // args.kv_block_size) + 1, device="cuda", dtype=dtype)
            cache.add_sequence(0)
            cache.reserve(0, L)
            tokens = torch.randint(0, args.vocab_size, (1, L), device="cuda")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(tokens, torch.tensor([0], device="cuda"), cache, cache.block_table([0]), attn=attn, chunk=chunk,
                  last_only=True)
            torch.cuda.synchronize()
            rows.append({"tokens": L, "ok": True, "seconds": time.perf_counter() - t0,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        except torch.OutOfMemoryError:
            rows.append({"tokens": L, "ok": False, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
            cache = None  # noqa: F841  (frees the cache before empty_cache)
            torch.cuda.empty_cache()
            break
        cache = None  # noqa: F841
        print(f"prefill {attn:6s} chunk={chunk:>7d} {L:>7d} tokens: {rows[-1]}", flush=True)
    return rows


def profile(model, cache, seqs, B: int, T: int) -> None:
    """Where a decode step's time goes: kernel launches and GPU time per op (diagnostic, no result file)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for attn in ("sparse", "dense"):
        for s in seqs:
            cache.lengths[s] = T
        decode_ms(model, cache, seqs, 2, attn)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ms = decode_ms(model, cache, seqs, 3, attn)
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
        print(f"== profile B={B} ctx={T} {attn}: {statistics.median(ms):.2f} ms/step (profiled), "
              f"{kernels / 3:.0f} GPU kernels/step", flush=True)
        print(events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60), flush=True)


def decode_config(model, cache, seqs, B: int, T: int, modes: list[str], steps: int) -> dict:
    """Sparse and dense decode at one (B, T), per mode, interleaved over two rounds. A mode that runs out of memory
    (graphs keep their temporaries in their own pool) is reported as such and the others go on."""
    width = len(cache.tables[seqs[0]])
    pool = torch.cuda.graph_pool_handle()  # the two graphs take turns: one pool for both
    graphs = {attn: DecodeGraph(model, cache, B, width, attn=attn, pool=pool) for attn in ("sparse", "dense")}
    res: dict[str, list[float]] = {}
    failed: set[str] = set()
    for rep in range(2):
        for mode in modes:
            if mode in failed:
                continue
            for attn in ("sparse", "dense"):
                for s in seqs:  # reset lengths so each pass decodes from T
                    cache.lengths[s] = T
                g = graphs[attn] if mode == "graph" else None
                try:  # the first step of a pass warms up (and captures a graph the first time)
                    res.setdefault(attn + ("_graph" if g else ""), []).extend(
                        decode_ms(model, cache, seqs, steps, attn, g)[1:])
                except torch.OutOfMemoryError:
                    failed.add(mode)
                    if mode == "graph":
                        graphs.clear()
                    torch.cuda.empty_cache()
                    break
    graphs.clear()
    row: dict = {"B": B, "context": T}
    for mode in modes:
        sfx = "_graph" if mode == "graph" else ""
        if mode in failed:
            row["oom" + sfx] = True
            continue
        for attn in ("sparse", "dense"):
            med = statistics.median(res[attn + sfx])
            row[attn + sfx] = {"median_ms": med, "tokens_per_s": B * 1e3 / med}
        row["speedup_sparse_vs_dense" + sfx] = row["dense" + sfx]["median_ms"] / row["sparse" + sfx]["median_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", default="8192,16384,32768,65536,131072")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's per-op table of 3 decode steps per mode and configuration, then exit")
    ap.add_argument("--modes", default="eager,graph",
                    help="eager forwards and/or CUDA-graph replays (model/graphs.py), side by side")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if not modes or set(modes) - {"eager", "graph"}:
        ap.error("--modes takes eager and/or graph")
    dtype = torch.bfloat16
    args = preset("small")
    torch.manual_seed(0)
    model = build_model(args, device="cuda", dtype=dtype)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": "small",
                    "model": {k: getattr(args, k) for k in ("n_layers", "dim", "n_heads", "kv_lora_rank",
                                                            "index_n_heads", "index_head_dim", "index_topk")},
                    "decode": [], "prefill": {}}
    # prefill first, on a clean allocator, so that its peak memory is its own
    lengths = [int(x) for x in a.prefill.split(",") if x]
    if lengths:
        report["prefill"]["sparse_chunked"] = longest_prefill(model, args, dtype, lengths, "sparse", 128)
        report["prefill"]["dense_unchunked"] = longest_prefill(model, args, dtype, lengths, "dense", 1 << 30)
    for B in map(int, a.batches.split(",")):
        for T in map(int, a.contexts.split(",")):
            try:
                cache, seqs = filled_cache(args, B, T, a.steps, "cuda", dtype)
            except torch.OutOfMemoryError:
                report["decode"].append({"B": B, "context": T, "oom": True})
                print(f"decode B={B} ctx={T}: the KV cache does not fit", flush=True)
                continue
            if a.profile:
                profile(model, cache, seqs, B, T)
            else:
                row = decode_config(model, cache, seqs, B, T, modes, a.steps)
                report["decode"].append(row)
                line = f"decode B={B:2d} ctx={T:7d}:"
                for mode in modes:
                    sfx = "_graph" if mode == "graph" else ""
                    if "speedup_sparse_vs_dense" + sfx not in row:
                        line += f"  [{mode}] out of memory"
                        continue
                    sp, de = row["sparse" + sfx]["median_ms"], row["dense" + sfx]["median_ms"]
                    line += (f"  [{mode}] sparse {sp:7.2f} ms ({B * 1e3 / sp:8.1f} tok/s) dense {de:7.2f} ms "
                             f"x{de / sp:.2f}")
                print(line, flush=True)
            cache = None  # noqa: F841
            torch.cuda.empty_cache()
    write_report(a.out, report)


if __name__ == "__main__":
    sys.exit(main())
