"""``dsa-otel receive``: an OTLP trace receiver (gRPC and HTTP/protobuf) that writes the same sharded JSONL.

A remote engine (or an OpenTelemetry Collector's ``otlp`` exporter) sends its spans here; each
(run_name, rank, block size) found in the resource attributes gets its own run directory under ``out_dir`` with the
exact layout the local exporter writes, so the files are identical whichever way the spans travelled.

Safety: binds 127.0.0.1 unless told otherwise; optional TLS (certificate + key files) and a bearer token
(``authorization: Bearer <token>``); a maximum message size (gRPC RESOURCE_EXHAUSTED / HTTP 413); malformed
requests get INVALID_ARGUMENT / 400, undecodable dsa payloads are counted as rejected spans in the OTLP
partial-success response; nothing a client sends can crash the server. ``stop()`` drains in-flight requests,
then finalises every run's shards and summary.
"""

from __future__ import annotations

import gzip
import hmac
import http.server
import os
import ssl
import threading
import zlib
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTracePartialSuccess,
                                                                       ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)

from dsa_otel.config import TraceConfig

from .jsonl import ShardedJsonlExporter
from .otlp_convert import RunKey, request_spans

log = structlog.get_logger("dsa_otel.receiver")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class ReceiverStats:
    requests: int = 0
    spans: int = 0
    rejected_spans: int = 0
    bad_requests: int = 0
    unauthenticated: int = 0
    oversized: int = 0
    runs: list[str] = field(default_factory=list)


class TraceSink:
    """Routes received spans to one ShardedJsonlExporter per run key (thread-safe)."""

    def __init__(self, out_dir: str, max_requests_per_file: int = 4, compression: str = "none") -> None:
        self.out_dir = out_dir
        self.max_requests_per_file = max_requests_per_file
        self.compression = compression
        self.exporters: dict[RunKey, ShardedJsonlExporter] = {}
        self.stats = ReceiverStats()
        self._lock = threading.Lock()

    def _exporter(self, key: RunKey) -> ShardedJsonlExporter:
        exp = self.exporters.get(key)
        if exp is None:
            cfg = TraceConfig(out_dir=self.out_dir, run_name=key.run_name, rank=key.rank, world_size=key.world_size,
                              kv_block_size=key.kv_block_size, detail=key.detail, dataset=key.dataset,  # type: ignore
                              max_requests_per_file=self.max_requests_per_file, compression=self.compression,
                              extra={"received": True})
            exp = self.exporters[key] = ShardedJsonlExporter(cfg, stats_provider=self._tracing)
            self.stats.runs.append(cfg.run_dir)
        return exp

    def _tracing(self) -> dict[str, Any]:
        s = self.stats
        return {"received_requests": s.requests, "received_spans": s.spans, "rejected_spans": s.rejected_spans}

    def consume(self, req: ExportTraceServiceRequest) -> tuple[int, str]:
        """Write a request's spans; returns (rejected span count, error message)."""
        by_key: dict[RunKey, list] = {}
        n = 0
        for key, item in request_spans(req):
            by_key.setdefault(key, []).append(item)
            n += 1
        rejected = 0
        message = ""
        with self._lock:
            self.stats.requests += 1
            self.stats.spans += n
            for key, items in by_key.items():
                exp = self._exporter(key)
                before = exp.decode_errors
                result = exp.write_spans(items)
                rejected += exp.decode_errors - before
                if result.name != "SUCCESS":
                    rejected += len(items)
                    message = "write failed"
            self.stats.rejected_spans += rejected
        if rejected and not message:
            message = f"{rejected} span(s) carried an undecodable dsa.step.payload"
        return rejected, message

    def close(self) -> None:
        with self._lock:
            for exp in self.exporters.values():
                exp.shutdown()


def _authorized(token: str | None, header: str | None) -> bool:
    if not token:
        return True
    expected = f"Bearer {token}"
    return header is not None and hmac.compare_digest(header.encode(), expected.encode())


TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class _TraceService:
    """OTLP TraceService/Export over gRPC. Registered with a raw-bytes deserializer so that a malformed message
    gets INVALID_ARGUMENT from us instead of grpc's generic INTERNAL."""

    def __init__(self, sink: TraceSink, token: str | None) -> None:
        self.sink = sink
        self.token = token

    def handler(self) -> grpc.GenericRpcHandler:
        export = grpc.unary_unary_rpc_method_handler(
            self.export, request_deserializer=None,
            response_serializer=ExportTraceServiceResponse.SerializeToString)
        return grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": export})

    def export(self, raw: bytes, context: grpc.ServicerContext) -> ExportTraceServiceResponse:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        if not _authorized(self.token, md.get("authorization")):
            self.sink.stats.unauthenticated += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        req = ExportTraceServiceRequest()
        try:
            req.ParseFromString(raw)
        except (DecodeError, ValueError) as exc:
            self.sink.stats.bad_requests += 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed ExportTraceServiceRequest: {exc}")
        try:
            rejected, message = self.sink.consume(req)
        except Exception as exc:  # never let one request take the server down
            self.sink.stats.bad_requests += 1
            log.warning("could not process an export request", error=repr(exc))
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"could not process request: {type(exc).__name__}")
        resp = ExportTraceServiceResponse()
        if rejected:
            resp.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
        return resp


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    server_version = "dsa-otel-receiver"
    receiver: "Receiver"

    def log_message(self, format: str, *args: Any) -> None:  # route to structlog, quietly
        log.debug("http", message=format % args)

    def _reply(self, code: int, body: bytes = b"", ctype: str = "application/x-protobuf") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        r = self.receiver
        sink = r.sink
        if self.path.rstrip("/") != "/v1/traces":
            self._reply(404, b"not found", "text/plain")
            return
        if not _authorized(r.token, self.headers.get("Authorization")):
            sink.stats.unauthenticated += 1
            self._reply(401, b"missing or wrong bearer token", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            sink.stats.bad_requests += 1
            self._reply(411, b"Content-Length required", "text/plain")
            return
        if length > r.max_message_bytes:
            sink.stats.oversized += 1
            self._reply(413, b"request too large", "text/plain")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        try:
            enc = (self.headers.get("Content-Encoding") or "").lower()
            if enc == "gzip":
                body = _bounded_inflate(gzip.decompress, body, r.max_message_bytes)
            elif enc == "deflate":
                body = _bounded_inflate(zlib.decompress, body, r.max_message_bytes)
            ctype = (self.headers.get("Content-Type") or "application/x-protobuf").split(";")[0].strip()
            req = ExportTraceServiceRequest()
            if ctype == "application/json":
                from google.protobuf import json_format

                json_format.Parse(body.decode("utf-8"), req)
            elif ctype == "application/x-protobuf":
                req.ParseFromString(body)
            else:
                sink.stats.bad_requests += 1
                self._reply(415, b"unsupported content type", "text/plain")
                return
            rejected, message = sink.consume(req)
        except _TooLarge:
            sink.stats.oversized += 1
            self._reply(413, b"request too large after decompression", "text/plain")
            return
        except (DecodeError, ValueError, UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
            sink.stats.bad_requests += 1
            self._reply(400, f"malformed request: {type(exc).__name__}".encode(), "text/plain")
            return
        except Exception as exc:
            sink.stats.bad_requests += 1
            log.warning("could not process an HTTP export request", error=repr(exc))
            self._reply(400, f"could not process request: {type(exc).__name__}".encode(), "text/plain")
            return
        resp = ExportTraceServiceResponse()
        if rejected:
            resp.partial_success.CopyFrom(ExportTracePartialSuccess(rejected_spans=rejected, error_message=message))
        self._reply(200, resp.SerializeToString())


class _TooLarge(Exception):
    pass


def _bounded_inflate(fn: Any, body: bytes, limit: int) -> bytes:
    out = fn(body)
    if len(out) > limit:
        raise _TooLarge()
    return out


class Receiver:
    """OTLP/gRPC and OTLP/HTTP servers feeding one TraceSink."""

    def __init__(self, out_dir: str, *, host: str = "127.0.0.1", grpc_port: int | None = 4317,
                 http_port: int | None = 4318, token: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_requests_per_file: int = 4, compression: str = "none", workers: int = 4) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate and a key file")
        for path in (tls_cert, tls_key):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"TLS file not found: {path}")
        self.sink = TraceSink(out_dir, max_requests_per_file, compression)
        self.token = token
        self.max_message_bytes = max_message_bytes
        self.host = host
        self.grpc_server: grpc.Server | None = None
        self.http_server: http.server.ThreadingHTTPServer | None = None
        self.grpc_port = self.http_port = None
        if grpc_port is not None:
            opts = [("grpc.max_receive_message_length", max_message_bytes),
                    ("grpc.max_send_message_length", 4 * 1024 * 1024)]
            self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=opts)
            self.grpc_server.add_generic_rpc_handlers((_TraceService(self.sink, token).handler(),))
            addr = f"{host}:{grpc_port}"
            if tls_cert:
                with open(tls_cert, "rb") as c, open(tls_key, "rb") as k:  # type: ignore[arg-type]
                    creds = grpc.ssl_server_credentials([(k.read(), c.read())])
                self.grpc_port = self.grpc_server.add_secure_port(addr, creds)
            else:
                self.grpc_port = self.grpc_server.add_insecure_port(addr)
        if http_port is not None:
            handler = type("Handler", (_HttpHandler,), {"receiver": self})
            self.http_server = http.server.ThreadingHTTPServer((host, http_port), handler)
            self.http_server.daemon_threads = True
            if tls_cert:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                ctx.load_cert_chain(tls_cert, tls_key)
                self.http_server.socket = ctx.wrap_socket(self.http_server.socket, server_side=True)
            self.http_port = self.http_server.server_address[1]
        self._http_thread: threading.Thread | None = None

    def start(self) -> "Receiver":
        if self.grpc_server is not None:
            self.grpc_server.start()
        if self.http_server is not None:
            self._http_thread = threading.Thread(target=self.http_server.serve_forever, name="dsa-otel-http",
                                                 daemon=True)
            self._http_thread.start()
        log.info("receiving OTLP", grpc=f"{self.host}:{self.grpc_port}" if self.grpc_port else None,
                 http=f"{self.host}:{self.http_port}" if self.http_port else None, out_dir=self.sink.out_dir)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), then finalise every run."""
        if self.grpc_server is not None:
            self.grpc_server.stop(grace_s).wait(grace_s + 1)
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
        self.sink.close()

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
