"""Exporter throughput on the CPU: records per second and MB per second of each way to get traces out.

Same selections for every mode (B requests x L layers x K positions per step, 32K context):

    jsonl         dsa-otel, in-process sharded JSONL exporter (detail blocks)
    otlp          dsa-otel, OTLP/gRPC to `dsa-otel receive` on loopback (a separate process writing shards)
    vanilla-otlp  the plain OpenTelemetry pattern: one span per (request, step), one span event per layer with the
                  positions and block ids as list attributes, BatchSpanProcessor + OTLP/gRPC to the same receiver
    seed          the seed's capture and writer thread (per-sequence .tolist(), Python statistics, json.dumps)

Throughput = records / wall seconds from the first record to the flush returning (everything exported and, for
OTLP, acknowledged). MB/s: bytes written to disk (jsonl, seed) or OTLP protobuf bytes on the wire (encoded once
more, untimed, from an in-memory copy of the same spans).

    python bench/exporter_throughput.py --out bench/results/exporter-throughput-cpu.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import dir_bytes, write_report  # noqa: E402
from pipeline_vs_seed import SeedTracer, make_pool  # noqa: E402

from dsa_otel import DSATracer, TraceConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"receiver did not listen on {port}")


def drive_dsa(tracer: DSATracer, pool, steps: int, B: int, ctx: int) -> None:
    rids = list(range(B))
    for r in rids:
        tracer.start_request(r, ctx)
    for s in range(steps):
        seq = torch.full((B,), ctx + s, dtype=torch.long)
        for layer, idx in enumerate(pool[s % len(pool)]):
            tracer.record_topk(layer, idx, seq, rids)
        tracer.end_step()
    for r in rids:
        tracer.end_request(r)


def drive_vanilla(provider: TracerProvider, pool, steps: int, B: int, ctx: int, block: int) -> None:
    """What a first OpenTelemetry integration looks like: per-layer events with list attributes."""
    tracer = provider.get_tracer("vanilla")
    for s in range(steps):
        layers = pool[s % len(pool)]
        for b in range(B):
            with tracer.start_as_current_span("decode_step", attributes={"request_id": b, "step": ctx + s}) as sp:
                for layer, idx in enumerate(layers):
                    pos = sorted(idx[b].tolist())
                    sp.add_event("dsa.topk", {"layer": layer, "positions": pos,
                                              "block_ids": sorted({p // block for p in pos})})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--modes", default="jsonl,otlp,vanilla-otlp,seed")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    pool = make_pool(a.batch, a.layers, a.topk, a.ctx, 2, "cpu")
    records = a.steps * a.batch * a.layers
    tmp = tempfile.mkdtemp(prefix="dsa-exp-")
    port = free_port()
    recv_dir = os.path.join(tmp, "received")
    receiver = subprocess.Popen([sys.executable, "-m", "dsa_otel.cli", "receive", "--out", recv_dir,
                                 "--grpc-port", str(port), "--http-port", "-1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    report: dict = {"batch": a.batch, "layers": a.layers, "topk": a.topk, "ctx": a.ctx, "steps": a.steps,
                    "records": records, "cpu": os.cpu_count(), "modes": {}}
    try:
        wait_port(port)
        for mode in a.modes.split(","):
            out = os.path.join(tmp, mode)
            wire = None
            t0 = time.perf_counter()
            if mode in ("jsonl", "otlp"):
                cfg = TraceConfig(out_dir=out, run_name="r", detail="blocks", exporters=mode,
                                  otlp_endpoint=f"127.0.0.1:{port}", otlp_insecure=True, ring_slots=a.steps + 1,
                                  max_queue_size=max(4096, records))
                tracer = DSATracer(cfg)
                drive_dsa(tracer, pool, a.steps, a.batch, a.ctx)
                tracer.flush(timeout_s=600)
                wall = time.perf_counter() - t0
                tracer.shutdown()
                if mode == "otlp":  # the same spans once more into memory, to count their protobuf bytes
                    mem = InMemorySpanExporter()
                    t2 = DSATracer(cfg.replace(exporters="none", run_name="bytes"), exporters=[mem])
                    drive_dsa(t2, pool, a.steps, a.batch, a.ctx)
                    t2.shutdown()
                    wire = encode_spans(mem.get_finished_spans()).ByteSize()
            elif mode == "vanilla-otlp":
                provider = TracerProvider(resource=Resource.create({"service.name": "vanilla"}))
                provider.add_span_processor(BatchSpanProcessor(
                    OTLPSpanExporter(endpoint=f"127.0.0.1:{port}", insecure=True), max_queue_size=max(4096, records)))
                drive_vanilla(provider, pool, a.steps, a.batch, a.ctx, 64)
                provider.force_flush(600_000)
                wall = time.perf_counter() - t0
                provider.shutdown()
                mem = InMemorySpanExporter()
                p2 = TracerProvider()
                p2.add_span_processor(SimpleSpanProcessor(mem))
                drive_vanilla(p2, pool, a.steps, a.batch, a.ctx, 64)
                wire = encode_spans(mem.get_finished_spans()).ByteSize()
            elif mode == "seed":
                seed = SeedTracer(os.path.join(out, "block64"), 64, 4, with_positions=False)
                rids = list(range(a.batch))
                for s in range(a.steps):
                    for layer, idx in enumerate(pool[s % len(pool)]):
                        seed.record_dsa_topk(layer, idx, a.ctx + s - 1, a.ctx + s, rids)
                seed.close()
                wall = time.perf_counter() - t0
            else:
                raise SystemExit(f"unknown mode {mode}")
            size = wire if wire is not None else dir_bytes(out)
            row = {"records_per_s": records / wall, "mb_per_s": size / wall / 1e6, "bytes": size,
                   "bytes_per_record": size / records, "wall_s": wall,
                   "bytes_are": "OTLP protobuf on the wire" if wire is not None else "files on disk"}
            report["modes"][mode] = row
            print(f"{mode:13s} {row['records_per_s']:10.0f} records/s  {row['mb_per_s']:7.2f} MB/s  "
                  f"{row['bytes_per_record']:8.0f} B/record ({row['bytes_are']})", flush=True)
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    write_report(a.out, report)


if __name__ == "__main__":
    main()
