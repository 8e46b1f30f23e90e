"""Records/s per core and bytes/record: dsa-otel's pipeline vs the seed's per-record Python path.

Both consume the same top-k tensors (B requests x L layers x K positions per decode step) and end with the same
seed-layout JSONL on disk. Measured side by side in one process run, interleaved, CPU time of the whole process
(all threads) so background work is counted.

The seed path re-implemented faithfully from its description (docs/seed-system.md): per layer, per sequence
``.tolist()``, Python statistics (set / sort / dict of block counts / percentiles by index), ``json.dumps``, a queue
to a writer thread sharded by request_id // N, and summary values kept in Python lists.

    python bench/pipeline_vs_seed.py                    # B=8, 61 layers, K=2048, 32K context (the doc's case)
    python bench/pipeline_vs_seed.py --quick            # small, for CI smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import resource
import shutil
import sys
import tempfile
import threading
import time

import torch

from dsa_otel import DSATracer, TraceConfig


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ----------------------------------------------------------------------------------------- the seed's path
class SeedWriter:
    def __init__(self, run_dir: str, width: int) -> None:
        self.run_dir, self.width = run_dir, width
        os.makedirs(run_dir, exist_ok=True)
        self.q: queue.Queue = queue.Queue(maxsize=10000)
        self.files: dict[int, object] = {}
        self.bytes = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            shard, line = item
            f = self.files.get(shard)
            if f is None:
                a = shard * self.width
                f = self.files[shard] = open(os.path.join(self.run_dir, f"trace_steps_{a}_{a + self.width - 1}.jsonl"), "w")
            f.write(line + "\n")
            self.bytes += len(line) + 1

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        for f in self.files.values():
            f.close()  # type: ignore[attr-defined]


class SeedTracer:
    def __init__(self, run_dir: str, block_size: int, width: int, with_positions: bool) -> None:
        self.bs = block_size
        self.width = width
        self.with_positions = with_positions
        self.writer = SeedWriter(run_dir, width)
        self.summary: dict[str, list] = {"unique_blocks": [], "touched_block_ratio": [], "tokens_per_touched_block": [],
                                         "offsets": []}

    def record_dsa_topk(self, layer_id: int, topk: torch.Tensor, start_pos: int, end_pos: int, request_ids: list) -> None:
        for b, rid in enumerate(request_ids):
            pos = topk[b].tolist()  # the seed's per-sequence .tolist() (a GPU sync on CUDA)
            pos = [p for p in pos if 0 <= p < end_pos]
            uniq = sorted(set(pos))
            offsets = sorted(end_pos - 1 - p for p in uniq)
            counts: dict[int, int] = {}
            for p in uniq:
                counts[p // self.bs] = counts.get(p // self.bs, 0) + 1
            per_block = sorted(counts.values())
            total_blocks = (end_pos + self.bs - 1) // self.bs
            rec = {
                "request_id": rid, "layer_id": layer_id, "step_idx": start_pos, "seq_len_current": end_pos,
                "unique_token_pos_count": len(uniq),
                "offset_min": offsets[0] if offsets else 0, "offset_p50": offsets[len(offsets) // 2] if offsets else 0,
                "offset_max": offsets[-1] if offsets else 0,
                "unique_blocks": len(counts), "total_blocks_in_use": total_blocks,
                "touched_block_ratio": len(counts) / max(1, total_blocks),
                "tokens_per_touched_block": {
                    "mean": sum(per_block) / max(1, len(per_block)),
                    "p50": per_block[len(per_block) // 2] if per_block else 0,
                    "p95": per_block[int(0.95 * (len(per_block) - 1))] if per_block else 0},
                "selected_block_ids": sorted(counts),
                "kv_fetch": {"hbm": {"bytes_read": len(pos) * 656, "batch_size": len(request_ids)}},
                "prefix": {"prefix_cache_hit": False, "prefix_cached_blocks": 0, "prefix_key": None,
                           "intersection_ratio": 0.0},
            }
            if self.with_positions:
                rec["selected_token_pos"] = pos
            self.summary["unique_blocks"].append(len(counts))
            self.summary["touched_block_ratio"].append(rec["touched_block_ratio"])
            self.summary["tokens_per_touched_block"].append(rec["tokens_per_touched_block"]["mean"])
            self.summary["offsets"].extend(offsets)
            self.writer.q.put((rid // self.width, json.dumps(rec)))

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------------------- workload
def make_pool(B: int, L: int, K: int, ctx: int, variants: int, device: str) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    pool = []
    for _ in range(variants):
        layers = []
        for _ in range(L):
            scores = torch.rand(B, ctx, generator=g)
            scores[:, -K // 8:] += 1.0  # recency
            layers.append(torch.topk(scores, K, dim=1).indices.to(device))
        pool.append(layers)
    return pool


def run_dsa(pool, args, out: str, detail: str) -> dict:
    cfg = TraceConfig(out_dir=out, run_name=f"dsa-{detail}", detail=detail, kv_block_size=64,
                      ring_slots=args.pace + 1, max_queue_size=max(4096, args.steps * args.batch * 2))
    rids = list(range(args.batch))
    seq = torch.full((args.batch,), args.ctx, dtype=torch.long)
    c0, w0 = cpu_seconds(), time.perf_counter()
    tracer = DSATracer(cfg)
    hot = 0.0
    for r in rids:
        tracer.start_request(r, args.ctx)
    for s in range(args.steps):
        layers = pool[s % len(pool)]
        h0 = time.perf_counter()
        for layer_id, idx in enumerate(layers):
            tracer.record_topk(layer_id, idx, seq, rids)
        tracer.end_step()
        hot += time.perf_counter() - h0
        if (s + 1) % args.pace == 0:  # a model takes time per step; here the producer waits for the pipeline
            tracer.flush()
    for r in rids:
        tracer.end_request(r)
    tracer.shutdown(timeout_s=600)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    stats = tracer.tracing_stats()
    size = sum(os.path.getsize(os.path.join(cfg.run_dir, f)) for f in os.listdir(cfg.run_dir) if f.startswith("trace_"))
    records = args.steps * args.batch * args.layers
    assert stats["rows_traced"] == records, stats
    return {"mode": f"dsa-otel/{detail}", "records": records, "cpu_s": cpu, "wall_s": wall,
            "records_per_cpu_s": records / cpu, "bytes_per_record": size / records,
            "model_thread_ms_per_step": 1e3 * hot / args.steps, "steps_dropped": stats["steps_dropped"]}


def run_seed(pool, args, out: str, with_positions: bool) -> dict:
    run_dir = os.path.join(out, f"seed-{'full' if with_positions else 'blocks'}", "block64")
    rids = list(range(args.batch))
    c0, w0 = cpu_seconds(), time.perf_counter()
    tr = SeedTracer(run_dir, 64, 4, with_positions)
    hot = 0.0
    for s in range(args.steps):
        layers = pool[s % len(pool)]
        h0 = time.perf_counter()
        for layer_id, idx in enumerate(layers):
            tr.record_dsa_topk(layer_id, idx, args.ctx - 1, args.ctx, rids)
        hot += time.perf_counter() - h0
    tr.close()
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump({k: len(v) for k, v in tr.summary.items()}, f)
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    records = args.steps * args.batch * args.layers
    return {"mode": f"seed/{'full' if with_positions else 'blocks'}", "records": records, "cpu_s": cpu,
            "wall_s": wall, "records_per_cpu_s": records / cpu, "bytes_per_record": tr.writer.bytes / records,
            "model_thread_ms_per_step": 1e3 * hot / args.steps, "steps_dropped": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--pace", type=int, default=4, help="dsa-otel: wait for the pipeline every N steps, as a "
                    "model's own step time would (keeps the snapshot ring's buffers in reuse)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.layers, args.topk, args.ctx, args.steps, args.repeats = 2, 4, 256, 4096, 3, 1
    torch.set_num_threads(1)  # per-core comparison: torch's intra-op pool would otherwise use every core
    pool = make_pool(args.batch, args.layers, args.topk, args.ctx, 2, "cpu")
    out = tempfile.mkdtemp(prefix="dsa-bench-")
    results: list[dict] = []
    try:
        for rep in range(args.repeats):  # interleaved so drift hits every mode alike
            results.append(run_seed(pool, args, out, with_positions=True))
            results.append(run_dsa(pool, args, out, "full"))
            results.append(run_seed(pool, args, out, with_positions=False))
            results.append(run_dsa(pool, args, out, "blocks"))
            results.append(run_dsa(pool, args, out, "summary"))
            shutil.rmtree(out)
            os.makedirs(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    best: dict[str, dict] = {}
    for r in results:
        if r["mode"] not in best or r["records_per_cpu_s"] > best[r["mode"]]["records_per_cpu_s"]:
            best[r["mode"]] = r
    print(f"B={args.batch} layers={args.layers} K={args.topk} ctx={args.ctx} steps={args.steps} "
          f"({args.batch * args.layers * args.steps} records per run), best of {args.repeats}")
    print(f"{'mode':18s} {'records/cpu-s':>14s} {'bytes/record':>13s} {'model-thread ms/step':>21s} {'dropped':>8s}")
    for m, r in best.items():
        print(f"{m:18s} {r['records_per_cpu_s']:14.0f} {r['bytes_per_record']:13.0f} "
              f"{r['model_thread_ms_per_step']:21.2f} {r['steps_dropped']:8d}")
    ratios = {
        "full: dsa-otel / seed records per cpu-s": best["dsa-otel/full"]["records_per_cpu_s"] / best["seed/full"]["records_per_cpu_s"],
        "blocks: dsa-otel / seed records per cpu-s": best["dsa-otel/blocks"]["records_per_cpu_s"] / best["seed/blocks"]["records_per_cpu_s"],
        "full: model-thread time seed / dsa-otel": best["seed/full"]["model_thread_ms_per_step"] / best["dsa-otel/full"]["model_thread_ms_per_step"],
    }
    for k, v in ratios.items():
        print(f"{k}: {v:.1f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": platform.machine(), "python": sys.version.split()[0],
                       "torch": torch.__version__, "cpu_count": os.cpu_count(), "results": results,
                       "best": best, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
