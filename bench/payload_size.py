"""Bytes per (request, step, layer) record: the compact StepPayload (raw protobuf, base64 in the span attribute,
and the whole OTLP-encoded span) vs the seed's JSON line, at full and blocks detail.

Selections come from a real-shaped indexer top-k (recency + heavy hitters, dsa_otel.synthetic) of K=2048 over
contexts of 8K, 32K and 128K tokens, 61 layers, one request.

    python bench/payload_size.py --json bench/results/payload-size.json
"""

from __future__ import annotations

import argparse
import base64
import os
import sys

import torch
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_report  # noqa: E402
from pipeline_vs_seed import SeedTracer  # noqa: E402

from dsa_otel import DSATracer, TraceConfig, semconv as sc  # noqa: E402
from dsa_otel.synthetic import SyntheticWorkload, topk_for_step  # noqa: E402


def measure(ctx: int, detail: str, layers: int, K: int, tmp: str) -> dict:
    w = SyntheticWorkload(n_requests=1, batch_size=1, topk=K, n_layers=layers, seed=1)
    seq = torch.tensor([ctx])
    sels = [topk_for_step(w, seq, layer, 0) for layer in range(layers)]
    mem = InMemorySpanExporter()
    tr = DSATracer(TraceConfig(out_dir=tmp, run_name=f"p{ctx}{detail}", detail=detail, ring_slots=4,
                               payload_chunk_bytes=0), exporters=[mem])
    for layer, idx in enumerate(sels):
        tr.record_topk(layer, idx, seq, [0])
    tr.end_step()
    tr.shutdown()
    step = next(s for s in mem.get_finished_spans() if s.name == sc.SPAN_DECODE_STEP)
    b64 = step.attributes[sc.PAYLOAD]
    raw = len(base64.b64decode(b64))
    otlp = len(encode_spans([step]).SerializeToString())
    seed = SeedTracer(os.path.join(tmp, f"seed{ctx}{detail}"), 64, 4, with_positions=(detail == "full"))
    for layer, idx in enumerate(sels):
        seed.record_dsa_topk(layer, idx, ctx - 1, ctx, [0])
    seed.close()
    seed_bytes = seed.writer.bytes
    return {"ctx": ctx, "detail": detail, "layers": layers, "topk": K,
            "payload_raw_per_record": raw / layers, "payload_b64_per_record": len(b64) / layers,
            "otlp_span_per_record": otlp / layers, "seed_json_per_record": seed_bytes / layers,
            "ratio_b64_to_seed": len(b64) / seed_bytes, "ratio_otlp_to_seed": otlp / seed_bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--topk", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for detail in ("full", "blocks"):
            for ctx in (8192, 32768, 131072):
                rows.append(measure(ctx, detail, args.layers, args.topk, tmp))
    print(f"{'detail':7s} {'ctx':>7s} {'seed JSON':>10s} {'payload':>8s} {'base64':>8s} {'OTLP span':>10s} {'b64/seed':>9s}")
    for r in rows:
        print(f"{r['detail']:7s} {r['ctx']:7d} {r['seed_json_per_record']:10.0f} {r['payload_raw_per_record']:8.0f} "
              f"{r['payload_b64_per_record']:8.0f} {r['otlp_span_per_record']:10.0f} {r['ratio_b64_to_seed']:9.3f}")
    write_report(args.json, rows)


if __name__ == "__main__":
    main()
