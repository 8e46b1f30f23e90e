"""OTLP protobuf / OTLP-JSON spans -> the (name, attributes, trace id) triples the JSONL writer takes.

Shared by ``dsa-otel receive`` (protobuf over gRPC or HTTP) and the reader of the Collector's ``file`` exporter
(OTLP JSON lines), so a run that travelled through a collector reads back exactly like one written locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from dsa_otel import semconv as sc


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return bytes(v.bytes_value)
    return getattr(v, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass(frozen=True)
class RunKey:
    """Where a span's records belong: one JSONL run directory per (run, rank, block size, world size)."""

    run_name: str
    rank: int
    world_size: int
    kv_block_size: int
    detail: str
    dataset: str


def run_key(resource_attrs: dict[str, Any]) -> RunKey:
    def as_int(key: str, default: int) -> int:
        try:
            return int(resource_attrs.get(key, default))
        except (TypeError, ValueError):
            return default

    return RunKey(run_name=str(resource_attrs.get(sc.RES_RUN_NAME) or "received"),
                  rank=as_int(sc.RES_RANK, 0), world_size=max(1, as_int(sc.RES_WORLD_SIZE, 1)),
                  kv_block_size=max(1, as_int(sc.RES_KV_BLOCK_SIZE, 64)),
                  detail=str(resource_attrs.get(sc.RES_DETAIL) or "blocks"),
                  dataset=str(resource_attrs.get(sc.RES_DATASET) or ""))


def request_spans(req: ExportTraceServiceRequest) -> Iterator[tuple[RunKey, tuple[str, dict[str, Any], int]]]:
    """(run key, (span name, attributes, trace id)) for every span of an export request, in order."""
    for rs in req.resource_spans:
        key = run_key(attributes(rs.resource.attributes))
        for ss in rs.scope_spans:
            for span in ss.spans:
                trace_id = int.from_bytes(span.trace_id, "big") if span.trace_id else 0
                yield key, (span.name, attributes(span.attributes), trace_id)
