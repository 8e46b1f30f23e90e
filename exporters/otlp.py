"""OTLP span exporters (the official opentelemetry-exporter-otlp), configured from TraceConfig.

Unset fields fall through to the exporters' own handling of the standard ``OTEL_EXPORTER_OTLP_*`` variables,
so a deployment configured for any OpenTelemetry SDK works unchanged.
"""

from __future__ import annotations

from opentelemetry.sdk.trace.export import SpanExporter

from dsa_otel.config import TraceConfig


def parse_headers(raw: str | None) -> dict[str, str] | None:
    """``k1=v1,k2=v2`` (the OTEL_EXPORTER_OTLP_HEADERS format) into a dict."""
    if not raw:
        return None
    out: dict[str, str] = {}
    for part in raw.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise ValueError(f"OTLP header {part!r} is not key=value")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def build_otlp_exporter(config: TraceConfig) -> SpanExporter:
    protocol = config.otlp_protocol or "grpc"
    timeout_s = config.export_timeout_ms / 1000.0
    headers = parse_headers(config.otlp_headers)
    if protocol == "grpc":
        from grpc import Compression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        comp = {"gzip": Compression.Gzip, "none": Compression.NoCompression, None: None}.get(
            config.otlp_compression)
        return GrpcExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure, headers=headers,
                            timeout=timeout_s, compression=comp)
    from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    endpoint = config.otlp_endpoint
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    comp = {"gzip": HttpCompression.Gzip, "deflate": HttpCompression.Deflate,
            "none": HttpCompression.NoCompression, None: None}.get(config.otlp_compression)
    return HttpExporter(endpoint=endpoint, headers=headers, timeout=timeout_s, compression=comp)
