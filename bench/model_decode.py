"""Reference DSA model on the GPU: decode tokens/s of truly sparse attention vs dense-then-mask, and the longest
prefill that fits (sparse chunked vs dense unchunked, the seed's way).

Decode: the `small` preset in bf16; each sequence's paged KV cache is filled with random latents / RoPE keys /
index keys up to the context length (decode cost does not depend on the values), then both attention modes decode
the same steps, interleaved. Prefill: real forward passes of growing prompts until one runs out of memory.

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
from dsa_otel.model.kv import PagedKVCache  # noqa: E402


def decode_ms(model, cache, seqs, steps: int, attn: str) -> list[float]:
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
        model(tok, start, cache, table, attn=attn, last_only=True)
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
            del cache
            torch.cuda.empty_cache()
            break
        del cache
        print(f"prefill {attn:6s} chunk={chunk:>7d} {L:>7d} tokens: {rows[-1]}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="4096,8192,16384,32768,65536,131072")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--prefill", default="8192,16384,32768,65536,131072")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dtype = torch.bfloat16
    args = preset("small")
    torch.manual_seed(0)
    model = build_model(args, device="cuda", dtype=dtype)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": "small",
                    "model": {k: getattr(args, k) for k in ("n_layers", "dim", "n_heads", "kv_lora_rank",
                                                            "index_n_heads", "index_head_dim", "index_topk")},
                    "decode": [], "prefill": {}}
    for B in map(int, a.batches.split(",")):
        for T in map(int, a.contexts.split(",")):
            try:
                cache, seqs = filled_cache(args, B, T, a.steps, "cuda", dtype)
                res = {}
                for rep in range(2):  # interleaved
                    for attn in ("sparse", "dense"):
                        for s in seqs:  # reset lengths so each pass decodes from T
                            cache.lengths[s] = T
                        res.setdefault(attn, []).extend(decode_ms(model, cache, seqs, a.steps, attn)[1:])
                row = {"B": B, "context": T}
                for attn, ts in res.items():
                    med = statistics.median(ts)
                    row[attn] = {"median_ms": med, "tokens_per_s": B * 1e3 / med}
                row["speedup_sparse_vs_dense"] = row["dense"]["median_ms"] / row["sparse"]["median_ms"]
                report["decode"].append(row)
                print(f"decode B={B:2d} ctx={T:7d}: sparse {row['sparse']['median_ms']:8.2f} ms "
                      f"({row['sparse']['tokens_per_s']:8.1f} tok/s)  dense {row['dense']['median_ms']:8.2f} ms  "
                      f"x{row['speedup_sparse_vs_dense']:.2f}", flush=True)
                del cache
            except torch.OutOfMemoryError:
                report["decode"].append({"B": B, "context": T, "oom": True})
                print(f"decode B={B} ctx={T}: out of memory", flush=True)
            torch.cuda.empty_cache()
    lengths = [int(x) for x in a.prefill.split(",") if x]
    if lengths:
        report["prefill"]["sparse_chunked"] = longest_prefill(model, args, dtype, lengths, "sparse", 128)
        report["prefill"]["dense_unchunked"] = longest_prefill(model, args, dtype, lengths, "dense", 1 << 30)
    write_report(a.out, report)


if __name__ == "__main__":
    sys.exit(main())
