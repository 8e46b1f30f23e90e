"""Tracing cost on the GPU for a simulated DeepSeek-V3.2 lightning-indexer decode step (61 layers).

Each layer computes the indexer for real: per-head scores q·k over the whole context (64 heads x 128 dims, bf16),
ReLU, head weights, sum, top-k(2048). Modes, interleaved and repeated in one run: tracing off; dsa-otel at
summary / blocks / full (JSONL on local disk); the seed's capture (per layer, per sequence .tolist(), Python
statistics, json.dumps, a writer thread). Reports median and p95 ms per step, ratio to off, drops, and
bytes written.

    python bench/gpu_capture.py --out bench/results/gpu-capture-h100.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from pipeline_vs_seed import SeedTracer  # noqa: E402

from dsa_otel import DSATracer, TraceConfig  # noqa: E402


class Indexer:
    def __init__(self, B: int, ctx: int, layers: int, heads: int = 64, dim: int = 128, topk: int = 2048):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.k = [torch.randn(B, ctx, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2)]
        self.q = torch.randn(B, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        self.w = torch.rand(B, heads, 1, device="cuda", dtype=torch.bfloat16, generator=g)
        self.layers, self.topk = layers, topk

    def layer(self, i: int) -> torch.Tensor:
        scores = torch.relu(torch.bmm(self.q, self.k[i % 2].transpose(1, 2)))  # [B, H, ctx]
        index_score = (scores * self.w).sum(1)
        return index_score.topk(self.topk, dim=-1).indices


def run_mode(mode: str, ix: Indexer, B: int, ctx: int, steps: int, out: str) -> dict:
    rids = list(range(B))
    seq = torch.full((B,), ctx, device="cuda", dtype=torch.long)
    tracer = seed = None
    if mode.startswith("dsa-otel"):
        detail = mode.split("/")[1]
        tracer = DSATracer(TraceConfig(out_dir=out, run_name=mode.replace("/", "-"), detail=detail, ring_slots=8))
        for r in rids:
            tracer.start_request(r, ctx)
    elif mode == "seed":
        seed = SeedTracer(os.path.join(out, "seed", "block64"), 64, 4, with_positions=True)
    times = []
    for s in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(ix.layers):
            idx = ix.layer(layer)
            if tracer is not None:
                tracer.record_topk(layer, idx, seq, rids)
            elif seed is not None:
                seed.record_dsa_topk(layer, idx, ctx - 1, ctx, rids)
        if tracer is not None:
            tracer.end_step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    res: dict = {"mode": mode, "step_ms": times}
    if tracer is not None:
        for r in rids:
            tracer.end_request(r)
        tracer.shutdown(timeout_s=120)
        st = tracer.tracing_stats()
        res.update(steps_dropped=st["steps_dropped"], spans_dropped=st["spans_dropped"],
                   steps_captured=st["steps_captured"])
    if seed is not None:
        seed.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="1x131072,8x32768,32x8192", help="BxCTX,...")
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed-steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (s)")
    ap.add_argument("--modes", default="off,dsa-otel/summary,dsa-otel/blocks,dsa-otel/full,seed")
    args = ap.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    modes = args.modes.split(",")
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
              "switch_interval_s": sys.getswitchinterval(), "configs": []}
    for cfg in args.configs.split(","):
        B, ctx = map(int, cfg.split("x"))
        ix = Indexer(B, ctx, args.layers)
        for _ in range(2):
            ix.layer(0)
        runs: dict[str, list] = {m: [] for m in modes}
        drops: dict[str, int] = {m: 0 for m in modes}
        tmp = tempfile.mkdtemp(prefix="dsa-gpu-")
        for rep in range(args.repeats):
            for m in modes:
                steps = args.seed_steps if m == "seed" else args.steps
                r = run_mode(m, ix, B, ctx, steps, tmp)
                runs[m] += r["step_ms"][1:]  # first step of a run warms up
                drops[m] += r.get("steps_dropped", 0) + r.get("spans_dropped", 0)
            shutil.rmtree(tmp)
            os.makedirs(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        off = statistics.median(runs["off"]) if "off" in runs else float("nan")
        row = {"B": B, "ctx": ctx, "modes": {}}
        for m in modes:
            med = statistics.median(runs[m])
            p95 = sorted(runs[m])[int(0.95 * (len(runs[m]) - 1))]
            row["modes"][m] = {"median_ms": med, "p95_ms": p95, "ratio_to_off": med / off, "drops": drops[m],
                               "samples": len(runs[m])}
            print(f"B={B:3d} ctx={ctx:6d} {m:18s} median {med:8.2f} ms  p95 {p95:8.2f} ms  x{med / off:6.3f}  "
                  f"drops {drops[m]}", flush=True)
        report["configs"].append(row)
        del ix
        torch.cuda.empty_cache()
    write_report(args.out, report)


if __name__ == "__main__":
    main()
