"""Where a traced decode step's time goes: host phases and GPU time, off vs traced vs record-only.

Why: a ratio from bench/overhead.py says *how much* tracing costs, not *where*. This script times each part of a
graph-replayed decode step (model/graphs.py) on the host with perf_counter and on the GPU with CUDA events:

    host_graph_ms   building the inputs, the replay launch and the tracer's record call
    host_trace_ms   end_step (the snapshot and, with the process worker, the whole hand-over)
    host_wait_ms    reading the sampled tokens back (the host waits for the GPU here)
    gpu_graph_ms    GPU time from before the inputs' copy to the end of the replay: it grows when the host is late
                    to launch the replay, e.g. because another thread held the GIL
    gpu_trace_ms    the snapshot's kernels after the replay

Modes, interleaved and rotated every round: ``off``; ``traced`` (blocks detail, the worker of --worker);
``record-only`` (record_topk, but end_step only forgets the step: the cost of the record call itself).

    python bench/step_breakdown.py --configs 1x32768,8x8192,32x32768         # GPU
    python bench/step_breakdown.py --device cpu --preset tiny --configs 2x256 --steps 4 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_model, filled_cache, write_report  # noqa: E402

from dsa_otel import DSATracer, TraceConfig  # noqa: E402
from dsa_otel.model.graphs import DecodeGraph  # noqa: E402

FIELDS = ("step_ms", "host_graph_ms", "host_trace_ms", "host_wait_ms", "gpu_graph_ms", "gpu_trace_ms")


class RecordOnly:
    """The tracer's record call, with end_step reduced to forgetting the step."""

    enabled = True

    def __init__(self, tracer: DSATracer) -> None:
        self.tracer = tracer
        self.record_topk = tracer.record_topk

    def end_step(self) -> bool:
        self.tracer._collector.reset()
        return True


class _NoEvent:
    def record(self) -> None:
        pass

    def elapsed_time(self, other: "_NoEvent") -> float:
        return 0.0


def run_round(hook, decode, cache, seqs, T: int, steps: int, first_rid: int, device: str) -> dict[str, list[float]]:
    B = len(seqs)
    for s in seqs:
        cache.lengths[s] = T
    rids = list(range(first_rid, first_rid + B))
    tracer = hook.tracer if isinstance(hook, RecordOnly) else hook
    if tracer is not None:
        for r in rids:
            tracer.start_request(r, T)
    cuda = device.startswith("cuda")
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)
    out: dict[str, list[float]] = {f: [] for f in FIELDS}
    events = []
    if cuda:
        torch.cuda.synchronize()
    for i in range(steps):
        ev = [torch.cuda.Event(enable_timing=True) if cuda else _NoEvent() for _ in range(3)]
        t0 = time.perf_counter()
        start = torch.tensor([cache.lengths[s] for s in seqs], device=device)
        table = cache.block_table(seqs)
        ev[0].record()
        logits = decode(tok, start, table, hook, rids)
        ev[1].record()
        t1 = time.perf_counter()
        for s in seqs:
            cache.advance(s, 1)
        if hook is not None:
            hook.end_step()
        ev[2].record()
        t2 = time.perf_counter()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        tok.tolist()
        t3 = time.perf_counter()
        if i >= 2:  # the first steps of a round warm up
            for f, v in zip(FIELDS[:4], (t3 - t0, t1 - t0, t2 - t1, t3 - t2)):
                out[f].append(v * 1e3)
            events.append(ev)
    if cuda:
        torch.cuda.synchronize()
    for ev in events:
        out["gpu_graph_ms"].append(ev[0].elapsed_time(ev[1]))
        out["gpu_trace_ms"].append(ev[1].elapsed_time(ev[2]))
    if tracer is not None:
        for r in rids:
            tracer.end_request(r)
        tracer.flush(timeout_s=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="1x32768,8x8192,32x32768", help="BxCONTEXT,...")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", default="process", choices=("thread", "process"))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    args, model, dtype = bench_model(a.preset, a.device)
    report: dict = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "preset": a.preset, "worker": a.worker, "steps": a.steps, "repeats": a.repeats, "configs": []}
    modes = ("off", "traced", "record-only")
    for spec in a.configs.split(","):
        B, T = map(int, spec.split("x"))
        cache, seqs = filled_cache(args, B, T, a.steps + 1, a.device, dtype)
        if cuda:  # decode as serving engines do: replay a CUDA graph of the step
            graph = DecodeGraph(model, cache, B, len(cache.tables[seqs[0]]))

            def decode(tok, start, table, hook, rids):
                return graph(tok, start, table, tracer=hook, request_ids=rids)
        else:
            def decode(tok, start, table, hook, rids):
                return model(tok, start, cache, table, tracer=hook, request_ids=rids, last_only=True)
        tracers = []
        hooks: dict[str, object] = {"off": None}
        for m in modes[1:]:
            cfg = TraceConfig(out_dir=tempfile.mkdtemp(prefix="dsa-breakdown-"), run_name=m, detail="blocks",
                              worker=a.worker, kv_block_size=args.kv_block_size, ring_slots=8)
            tr = DSATracer(cfg)
            tr.flush(timeout_s=120)  # a worker process is up before timing starts
            tracers.append(tr)
            hooks[m] = tr if m == "traced" else RecordOnly(tr)
        runs: dict[str, dict[str, list[float]]] = {m: {f: [] for f in FIELDS} for m in modes}
        rid = 0
        for rep in range(a.repeats):
            for m in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                got = run_round(hooks[m], decode, cache, seqs, T, a.steps, rid, a.device)
                rid += B
                for f in FIELDS:
                    runs[m][f] += got[f]
        for tr in tracers:
            tr.shutdown(timeout_s=120)
        off = statistics.median(runs["off"]["step_ms"])
        row = {"B": B, "context": T, "modes": {}}
        for m in modes:
            med = {f: statistics.median(v) if v else 0.0 for f, v in runs[m].items()}
            med["ratio_to_off"] = med["step_ms"] / off
            row["modes"][m] = med
            print(f"B={B:3d} ctx={T:7d} {m:12s} " + "  ".join(f"{f} {med[f]:.3f}" for f in FIELDS)
                  + f"  x{med['ratio_to_off']:.3f}", flush=True)
        report["configs"].append(row)
        del cache
        if cuda:
            del graph
            torch.cuda.empty_cache()
    write_report(a.out, report)


if __name__ == "__main__":
    main()
