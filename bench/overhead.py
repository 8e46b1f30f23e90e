"""End-to-end tracing overhead of the reference DSA model's decode, side by side with the seed's capture.

The `small` preset (bf16, GPU) decodes a batch whose paged KV cache is filled to the context length; every mode
decodes the same steps, interleaved and repeated in one run:

    off                        tracing disabled
    dsa-otel/<detail>/<worker> detail in summary|blocks|full, worker in thread|process, JSONL on local disk
    seed                       the seed's capture: per layer, per sequence .tolist(), Python statistics,
                               json.dumps, a writer thread (bench/pipeline_vs_seed.py: SeedTracer)

A step is what a serving engine does per decode step: reserve a slot, run the model (the tracer hook records each
layer's top-k with the block table), ``end_step``, and read the sampled tokens back (the host sync every engine
makes). Reported per mode: median / p95 ms per step, ratio to off, records and bytes exported per second of
decoding, drops, and CPU seconds of the tracing threads (and of the worker process).

    python bench/overhead.py --out bench/results/overhead-h100.json            # GPU figures, eager decode
    python bench/overhead.py --graph --out bench/results/overhead-h100-graph.json   # decode from a CUDA graph
    python bench/overhead.py --preset tiny --device cpu --configs 2x256 --steps 3 --repeats 1   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_model, dir_bytes, filled_cache, write_report  # noqa: E402
from pipeline_vs_seed import SeedTracer  # noqa: E402

from dsa_otel import DSATracer, TraceConfig  # noqa: E402
from dsa_otel.model.graphs import DecodeGraph  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


class SeedAdapter:
    """The seed's capture behind the tracer hook the model calls (record_topk per layer)."""

    enabled = True

    def __init__(self, run_dir: str, block_size: int, with_positions: bool) -> None:
        self.seed = SeedTracer(run_dir, block_size, 4, with_positions=with_positions)
        self.records = 0

    def record_topk(self, layer_id, topk, seq_lens, request_ids, step=None, scores=None, block_table=None):
        if not isinstance(layer_id, int):  # a CUDA graph hands over all layers at once; the seed took them one by one
            for i, lid in enumerate(layer_id):
                self.record_topk(lid, topk[i], seq_lens, request_ids)
            return
        end_pos = int(seq_lens[0])  # the seed took start_pos / end_pos as Python ints (one more sync)
        self.seed.record_dsa_topk(layer_id, topk, end_pos - 1, end_pos, request_ids)
        self.records += len(request_ids)

    def end_step(self) -> bool:
        return True

    def close(self) -> None:
        self.seed.close()


def cpu_seconds_of(tids: list[int], pids: list[int] | None = None) -> float:
    """utime+stime of threads of this process (and optionally of other processes), from /proc."""
    total = 0
    paths = [f"/proc/self/task/{t}/stat" for t in tids] + [f"/proc/{p}/stat" for p in pids or []]
    for p in paths:
        try:
            fields = open(p).read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK


class GCTimer:
    """Time spent in the traced process's garbage collector (tracing's Python objects can trigger collections
    that then run on the model thread)."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.total_s += time.perf_counter() - self._t0


GC = GCTimer()


def timed(fn, acc: list[float]):
    def call(*args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            acc[0] += time.perf_counter() - t0
    return call


def tracing_tids(before: set[int]) -> list[int]:
    return [t.native_id for t in threading.enumerate()
            if t.native_id is not None and t.native_id not in before and t is not threading.current_thread()]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Session:
    """One mode's tracer, kept for all rounds of a configuration (a worker process starts once, like a server's),
    with the threads / process whose CPU time is charged to tracing."""

    def __init__(self, mode: str, model, out: str, ring_slots: int = 0) -> None:
        self.mode, self.out = mode, out
        before = {t.native_id for t in threading.enumerate()}
        self.tracer = None
        self.worker_pids: list[int] = []
        if mode.startswith("dsa-otel"):
            _, detail, worker = mode.split("/")
            n = int(worker[len("process"):] or 1) if worker.startswith("process") else 1  # processN: N workers
            cfg = TraceConfig(out_dir=out, run_name=mode.replace("/", "-"), detail=detail,
                              worker="process" if worker.startswith("process") else worker, worker_processes=n,
                              kv_block_size=model.args.kv_block_size, ring_slots=ring_slots)
            self.tracer = DSATracer(cfg)
            if cfg.worker == "process":
                self.tracer.flush(timeout_s=120)  # the workers are up before timing starts
                self.worker_pids = self.tracer.tracing_stats()["worker_pids"]
        self.tids = tracing_tids(before)
        self.next_request = 0

    def close(self) -> dict:
        if self.tracer is None:
            return {}
        self.tracer.shutdown(timeout_s=300)
        return self.tracer.tracing_stats()


def run_steps(sess: Session, model, cache, seqs, T: int, steps: int, device: str, graph=None) -> dict:
    """One timed run: ``steps`` decode steps of a fresh batch of requests, then (untimed) flush. With ``graph``
    (a DecodeGraph) each step replays the captured forward instead of running it eagerly."""
    B = len(seqs)
    for s in seqs:
        cache.lengths[s] = T
    rids = list(range(sess.next_request, sess.next_request + B))
    sess.next_request += B
    tracer = sess.tracer
    seed = None
    if sess.mode == "seed":
        seed = tracer = SeedAdapter(os.path.join(sess.out, "seed", f"block{model.args.kv_block_size}"),
                                    model.args.kv_block_size, with_positions=True)
    elif tracer is not None:
        for r in rids:
            tracer.start_request(r, T)
    hook_s = [0.0]
    hook = _Hook(tracer, hook_s) if tracer is not None else None
    cpu0 = cpu_seconds_of(sess.tids)
    wcpu0 = cpu_seconds_of([], sess.worker_pids)
    dropped0 = tracer.tracing_stats()["steps_dropped"] if isinstance(tracer, DSATracer) else 0
    tok = torch.zeros(B, 1, dtype=torch.long, device=device)
    times = []
    sync(device)
    gc0 = GC.total_s
    t_run = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        start = torch.tensor([cache.lengths[s] for s in seqs], device=device)
        table = cache.block_table(seqs)
        if graph is None:
            logits = model(tok, start, cache, table, tracer=hook, request_ids=rids, last_only=True)
        else:
            logits = graph(tok, start, table, tracer=hook, request_ids=rids)
        for s in seqs:
            cache.advance(s, 1)
        if hook is not None:
            hook.end_step()
        tok = logits[:, -1].argmax(-1, keepdim=True)
        tok.tolist()  # the engine reads the sampled tokens back: one host sync per step
        times.append((time.perf_counter() - t0) * 1e3)
    decode_s = time.perf_counter() - t_run
    res: dict = {"step_ms": times, "model_thread_s": hook_s[0], "decode_s": decode_s, "rows": 0,
                 "gc_s": GC.total_s - gc0}
    if isinstance(tracer, DSATracer):
        for r in rids:
            tracer.end_request(r)
        tracer.flush(timeout_s=300)
        st = tracer.tracing_stats()
        res["steps_dropped"] = st["steps_dropped"] - dropped0
        res["rows"] = st["rows_traced"]  # cumulative; differenced by the caller
    elif seed is not None:
        seed.close()
        res["rows"] = seed.records
    res["tracing_cpu_s"] = cpu_seconds_of(sess.tids) - cpu0
    res["worker_cpu_s"] = cpu_seconds_of([], sess.worker_pids) - wcpu0
    return res


class _Hook:
    """The tracer as the model sees it, with the time spent inside its model-thread calls added to ``acc``."""

    def __init__(self, tracer, acc: list[float]) -> None:
        self.enabled = True
        self.record_topk = timed(tracer.record_topk, acc)
        self.end_step = timed(tracer.end_step, acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--configs", default="1x8192,8x8192,32x8192,1x32768,8x32768,32x32768,1x131072",
                    help="BxCONTEXT,...")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seed-steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--workers", default="thread,process",
                    help="thread, process, or processN (N worker processes sharing the requests), comma-separated")
    ap.add_argument("--details", default="summary,blocks,full")
    ap.add_argument("--no-seed", action="store_true")
    ap.add_argument("--graph", action="store_true",
                    help="decode by replaying a CUDA graph of the step (model/graphs.py), as serving engines do")
    ap.add_argument("--ring-slots", type=int, default=0,
                    help="TraceConfig.ring_slots of the traced modes (0: the default, 8 thread / 32 process)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args, model, dtype = bench_model(a.preset, a.device)
    modes = ["off"] + [f"dsa-otel/{d}/{w}" for w in a.workers.split(",") for d in a.details.split(",")]
    if not a.no_seed:
        modes.append("seed")
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    report: dict = {"gpu": gpu, "torch": torch.__version__, "preset": a.preset, "n_layers": args.n_layers,
                    "index_topk": args.index_topk, "steps": a.steps, "repeats": a.repeats, "graph": a.graph,
                    "ring_slots": a.ring_slots, "configs": []}
    for spec in a.configs.split(","):
        B, T = map(int, spec.split("x"))
        try:
            cache, seqs = filled_cache(args, B, T, max(a.steps, a.seed_steps), a.device, dtype)
        except torch.OutOfMemoryError:
            report["configs"].append({"B": B, "context": T, "oom": True})
            continue
        outs = {m: tempfile.mkdtemp(prefix="dsa-overhead-") for m in modes}
        sessions = {m: Session(m, model, outs[m], a.ring_slots) for m in modes}
        graph = DecodeGraph(model, cache, B, len(cache.tables[seqs[0]])) if a.graph else None
        run_steps(sessions["off"], model, cache, seqs, T, 3, a.device, graph)  # warm-up (and capture)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        rows_seen: dict[str, int] = {m: 0 for m in modes}
        for rep in range(a.repeats):
            for m in modes[rep % len(modes):] + modes[:rep % len(modes)]:  # rotate the order every round
                r = run_steps(sessions[m], model, cache, seqs, T, a.seed_steps if m == "seed" else a.steps,
                              a.device, graph)
                if m.startswith("dsa-otel"):
                    r["rows"], rows_seen[m] = r["rows"] - rows_seen[m], r["rows"]
                runs[m].append(r)
        finals = {m: sessions[m].close() for m in modes}
        for m in modes:
            runs[m][0]["bytes"] = dir_bytes(outs[m])
            shutil.rmtree(outs[m], ignore_errors=True)
        skip = 2  # the first steps of a run warm up
        off = statistics.median(t for r in runs["off"] for t in r["step_ms"][skip:])
        off_round = [statistics.median(r["step_ms"][skip:]) for r in runs["off"]]
        row: dict = {"B": B, "context": T, "modes": {}}
        for m in modes:
            ts = [t for r in runs[m] for t in r["step_ms"][skip:]]
            med = statistics.median(ts)
            p95 = sorted(ts)[int(0.95 * (len(ts) - 1))]
            dec = sum(r["decode_s"] for r in runs[m])
            n_steps = sum(len(r["step_ms"]) for r in runs[m])
            # ratio within each round (same conditions), then the median over rounds: robust to slow drift
            per_round = [statistics.median(r["step_ms"][skip:]) / o for r, o in zip(runs[m], off_round)]
            entry = {"median_ms": med, "p95_ms": p95, "ratio_to_off": med / off,
                     "ratio_to_off_by_round": statistics.median(per_round), "round_ratios": per_round,
                     "samples": len(ts)}
            entry["gc_ms_per_step"] = 1e3 * sum(r["gc_s"] for r in runs[m]) / n_steps
            if m != "off":
                entry.update(
                    records_per_s=sum(r.get("rows", 0) for r in runs[m]) / dec,
                    mb_per_s=runs[m][0]["bytes"] / dec / 1e6,
                    drops=sum(r.get("steps_dropped", 0) for r in runs[m]) + finals[m].get("spans_dropped", 0),
                    model_thread_ms_per_step=1e3 * sum(r["model_thread_s"] for r in runs[m]) / n_steps,
                    tracing_threads_cpu_ms_per_step=1e3 * sum(r.get("tracing_cpu_s", 0.0) for r in runs[m]) / n_steps,
                    worker_process_cpu_ms_per_step=1e3 * sum(r.get("worker_cpu_s", 0.0) for r in runs[m]) / n_steps)
            row["modes"][m] = entry
            print(f"B={B:3d} ctx={T:7d} {m:26s} median {med:7.2f} ms p95 {p95:7.2f}  x{med / off:6.3f} "
                  f"(by round x{entry['ratio_to_off_by_round']:6.3f})  drops {entry.get('drops', 0)}  "
                  f"model-thread {entry.get('model_thread_ms_per_step', 0):5.2f} ms  "
                  f"threads cpu {entry.get('tracing_threads_cpu_ms_per_step', 0):6.2f} ms  "
                  f"worker cpu {entry.get('worker_process_cpu_ms_per_step', 0):6.2f} ms  gc {entry['gc_ms_per_step']:5.2f} ms",
                  flush=True)
        report["configs"].append(row)
        del cache, graph
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    write_report(a.out, report)


if __name__ == "__main__":
    main()
