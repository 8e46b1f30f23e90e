"""Span exporters of dsa-otel: sharded JSONL (offline analysis), OTLP (collector -> Jaeger / Tempo), and the
readers that load what they wrote."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from opentelemetry.sdk.trace.export import SpanExporter

from dsa_otel.config import TraceConfig

from .jsonl import ShardedJsonlExporter
from .reader import read_records, recover_run


def build_exporters(config: TraceConfig,
                    stats_provider: Callable[[], Mapping[str, Any]] | None = None) -> list[SpanExporter]:
    """The exporters named by ``config.exporters`` (``none``: no span export, only counters)."""
    out: list[SpanExporter] = []
    if config.exporters in ("jsonl", "both"):
        out.append(ShardedJsonlExporter(config, stats_provider=stats_provider))
    if config.exporters in ("otlp", "both"):
        from .otlp import build_otlp_exporter

        out.append(build_otlp_exporter(config))
    return out


__all__ = ["build_exporters", "ShardedJsonlExporter", "read_records", "recover_run"]
