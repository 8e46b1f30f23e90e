"""OTLP: the real OTLP exporters -> `dsa-otel receive` on 127.0.0.1 -> the same JSONL as the direct exporter;
dead, killed and slow collectors never block the traced program; the receiver rejects bad input cleanly."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import subprocess
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                       ExportTraceServiceResponse)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.exporters import ShardedJsonlExporter, read_records
from dsa_otel.exporters.receiver import TRACE_SERVICE, Receiver
from conftest import free_port

EXPORT = f"/{TRACE_SERVICE}/Export"


def workload(tracer: DSATracer, n_requests=6, steps=3, layers=4, K=64, seed=0, pause=None):
    rng = np.random.default_rng(seed)
    ids = list(range(n_requests))
    for rid in ids:
        tracer.start_request(rid, 300)
    tracer.record_prefix(1, cached_blocks=2, physical_block_ids=[5, 6], prefix_key="k")
    table = torch.from_numpy(rng.permutation(400)[:n_requests * 8].reshape(n_requests, 8))
    worst = 0.0
    for s in range(steps):
        if pause is not None:
            pause(s)
        seq = torch.full((n_requests,), 300 + s)
        t0 = time.perf_counter()
        for layer in range(layers):
            idx = torch.from_numpy(np.stack([rng.choice(300, K, replace=False) for _ in ids]))
            tracer.record_topk(layer, idx, seq, ids, block_table=table)
        tracer.end_step()
        worst = max(worst, time.perf_counter() - t0)
    for rid in ids:
        tracer.end_request(rid)
    return worst


def shard_bytes(run_dir: str) -> dict[str, bytes]:
    return {f: open(os.path.join(run_dir, f), "rb").read() for f in sorted(os.listdir(run_dir))
            if f.startswith("trace_steps_")}


@pytest.fixture
def receiver(tmp_path):
    rec = Receiver(str(tmp_path / "received"), grpc_port=0, http_port=0).start()
    yield rec
    rec.stop(1)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
@pytest.mark.parametrize("detail", ["blocks", "full"])
def test_round_trip_identical_to_direct_jsonl(tmp_path, receiver, protocol, detail):
    port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    cfg = TraceConfig(out_dir=str(tmp_path / "direct"), run_name="rt", detail=detail, exporters="both",
                      otlp_protocol=protocol, otlp_endpoint=f"http://127.0.0.1:{port}", otlp_insecure=True,
                      ring_slots=64, payload_chunk_bytes=1024)
    tracer = DSATracer(cfg)
    workload(tracer)
    tracer.shutdown()
    assert tracer.tracing_stats()["export_errors"] == 0
    receiver.stop(2)
    direct = shard_bytes(cfg.run_dir)
    received = shard_bytes(str(tmp_path / "received" / "rt" / "block64"))
    assert direct and direct == received  # same shard files, byte for byte
    d = json.load(open(os.path.join(cfg.run_dir, "summary.json")))
    r = json.load(open(str(tmp_path / "received" / "rt" / "block64" / "summary.json")))
    assert d["distributions"] == r["distributions"] and d["hot_prefix_blocks"] == r["hot_prefix_blocks"]
    assert receiver.sink.stats.rejected_spans == 0


def _traced_program_with_otlp(tmp_path, endpoint, pause=None, steps=4):
    cfg = TraceConfig(out_dir=str(tmp_path / "t"), run_name="dead", exporters="otlp", otlp_endpoint=endpoint,
                      otlp_insecure=True, export_timeout_ms=1500, schedule_delay_ms=20, ring_slots=64,
                      max_queue_size=64, max_export_batch_size=8)
    t0 = time.perf_counter()
    tracer = DSATracer(cfg)
    worst = workload(tracer, steps=steps, pause=pause)
    tracer.shutdown(timeout_s=3)
    return tracer, worst, time.perf_counter() - t0


def test_collector_down_at_start_never_blocks(tmp_path):
    tracer, worst, total = _traced_program_with_otlp(tmp_path, f"http://127.0.0.1:{free_port()}")
    assert worst < 0.2 and total < 15
    st_ = tracer.tracing_stats()
    assert st_["export_errors"] + st_["spans_dropped"] > 0  # the loss is reported


def test_collector_killed_mid_run(tmp_path):
    rec = Receiver(str(tmp_path / "rx"), grpc_port=0, http_port=None).start()

    def pause(step):
        if step == 2:
            rec.stop(0)  # the collector dies between steps

    tracer, worst, total = _traced_program_with_otlp(tmp_path, f"http://127.0.0.1:{rec.grpc_port}", pause=pause,
                                                     steps=5)
    assert worst < 0.2 and total < 20
    assert tracer.tracing_stats()["export_errors"] + tracer.tracing_stats()["spans_dropped"] > 0


class _SlowService:
    def __init__(self, delay):
        self.delay = delay

    def export(self, raw, context):
        time.sleep(self.delay)
        return ExportTraceServiceResponse()


def test_slow_collector_never_blocks(tmp_path):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(_SlowService(5.0).export, request_deserializer=None,
                                                  response_serializer=ExportTraceServiceResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        tracer, worst, total = _traced_program_with_otlp(tmp_path, f"http://127.0.0.1:{port}", steps=6)
    finally:
        server.stop(0)
    assert worst < 0.2 and total < 20
    st_ = tracer.tracing_stats()
    assert st_["export_errors"] + st_["spans_dropped"] > 0


def _valid_request_bytes(tmp_path) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    mem = InMemorySpanExporter()
    tracer = DSATracer(TraceConfig(out_dir=str(tmp_path / "mem"), run_name="v", ring_slots=64), exporters=[mem])
    workload(tracer, n_requests=2, steps=1, layers=2)
    tracer.shutdown()
    return encode_spans(mem.get_finished_spans()).SerializeToString()


def test_grpc_rejections(tmp_path):
    rec = Receiver(str(tmp_path / "rx"), grpc_port=0, http_port=None, token="s3cret", max_message_bytes=20000).start()
    try:
        ch = grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}")
        call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        good = _valid_request_bytes(tmp_path)
        auth = (("authorization", "Bearer s3cret"),)
        with pytest.raises(grpc.RpcError) as e:
            call(good, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            call(good, metadata=(("authorization", "Bearer wrong"),), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff\x0f garbage", metadata=auth, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x00" * 30000, metadata=auth, timeout=5)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        resp = call(good, metadata=auth, timeout=5)  # still serving, and a good request is accepted whole
        assert resp.partial_success.rejected_spans == 0
        # a dsa span whose payload is garbage: accepted request, span counted as rejected
        req = ExportTraceServiceRequest.FromString(good)
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    for kv in sp.attributes:
                        if kv.key == "dsa.step.payload":
                            kv.value.string_value = "AAAA"
        resp = call(req.SerializeToString(), metadata=auth, timeout=5)
        assert resp.partial_success.rejected_spans == 2 and "payload" in resp.partial_success.error_message
    finally:
        rec.stop(1)


def _post(port, body, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/traces", body=body, headers={"Content-Type": "application/x-protobuf", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_http_rejections_and_gzip(tmp_path):
    rec = Receiver(str(tmp_path / "rx"), grpc_port=None, http_port=0, token="t", max_message_bytes=20000).start()
    try:
        good = _valid_request_bytes(tmp_path)
        auth = {"Authorization": "Bearer t"}
        assert _post(rec.http_port, good)[0] == 401
        assert _post(rec.http_port, b"\xff\x01garbage", auth)[0] == 400
        assert _post(rec.http_port, b"\x00" * 30000, auth)[0] == 413
        assert _post(rec.http_port, good, {**auth, "Content-Type": "text/plain"})[0] == 415
        bomb = gzip.compress(b"\x00" * 1_000_000)
        assert _post(rec.http_port, bomb, {**auth, "Content-Encoding": "gzip"})[0] == 413
        status, body = _post(rec.http_port, gzip.compress(good), {**auth, "Content-Encoding": "gzip"})
        assert status == 200 and ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 0
    finally:
        rec.stop(1)
    assert list(read_records(str(tmp_path / "rx"))), "the accepted request was written"


def test_receiver_survives_fuzzing(tmp_path):
    rec = Receiver(str(tmp_path / "rx"), grpc_port=0, http_port=0, max_message_bytes=100000).start()
    good = _valid_request_bytes(tmp_path)
    ch = grpc.insecure_channel(f"127.0.0.1:{rec.grpc_port}")
    call = ch.unary_unary(EXPORT, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=2000),
                     st.builds(lambda cut, flips: _mutate(good, cut, flips), st.integers(0, len(good)),
                               st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)), max_size=6))))
    def fuzz(blob):
        status, _ = _post(rec.http_port, blob)
        assert status in (200, 400)
        try:
            call(blob, timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT

    try:
        fuzz()
        assert _post(rec.http_port, good)[0] == 200  # still healthy
        call(good, timeout=5)
    finally:
        rec.stop(1)


def _mutate(data: bytes, cut: int, flips) -> bytes:
    b = bytearray(data)
    for i, v in flips:
        b[i] = v
    return bytes(b[:cut])


def test_tls_and_token_round_trip(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    rec = Receiver(str(tmp_path / "rx"), grpc_port=0, http_port=None, token="tok", tls_cert=str(cert),
                   tls_key=str(key)).start()
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        exp = OTLPSpanExporter(endpoint=f"localhost:{rec.grpc_port}", credentials=creds,
                               headers={"authorization": "Bearer tok"}, timeout=5)
        tracer = DSATracer(TraceConfig(out_dir=str(tmp_path / "t"), run_name="tls", ring_slots=64), exporters=[exp])
        workload(tracer, n_requests=2, steps=2, layers=2)
        tracer.shutdown()
        assert tracer.tracing_stats()["export_errors"] == 0
    finally:
        rec.stop(1)
    assert len(list(read_records(str(tmp_path / "rx" / "tls")))) == 2 * 2 * 2


def test_collector_file_exporter_output_reads_like_shards(tmp_path):
    """The Collector's `file` exporter writes one OTLP-JSON export request per line."""
    from google.protobuf import json_format
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    mem = InMemorySpanExporter()
    cfg = TraceConfig(out_dir=str(tmp_path / "direct"), run_name="f", detail="full", ring_slots=64)
    jsonl = ShardedJsonlExporter(cfg)
    tracer = DSATracer(cfg, exporters=[jsonl, mem])
    workload(tracer)
    tracer.shutdown()
    spans = mem.get_finished_spans()
    path = tmp_path / "collector-traces.json"
    with open(path, "w") as f:
        for chunk in (spans[:7], spans[7:]):
            f.write(json_format.MessageToJson(encode_spans(chunk), indent=None) + "\n")
        f.write('{"resourceSpans": [{"truncat')  # a torn last line
    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(read_records(str(path)), key=key) == sorted(read_records(cfg.run_dir), key=key)


def test_payload_chunks_reassemble_and_truncation_is_detected():
    import base64 as b64

    from dsa_otel.exporters.records import payload_of
    from dsa_otel.materializer import payload_attributes
    from dsa_otel.wire import encode_step_payload

    data = encode_step_payload(np.arange(3), ("a",), np.ones((3, 1)),
                               positions=(np.arange(3000), np.array([1000, 1000, 1000])))
    text = b64.b64encode(data).decode()
    attrs = payload_attributes(text, 256)
    assert attrs["dsa.step.payload_chunks"] == -(-len(text) // 256) and "dsa.step.payload" not in attrs
    assert all(len(v) <= 256 for k, v in attrs.items() if k.startswith("dsa.step.payload."))
    assert payload_of(attrs).positions.values.tolist() == list(range(3000))
    assert payload_attributes(text, 0) == {"dsa.step.payload": text}
    broken = dict(attrs)
    broken["dsa.step.payload.1"] = broken["dsa.step.payload.1"][:100]  # a backend truncated one chunk
    with pytest.raises(ValueError):
        payload_of(broken)
    del broken["dsa.step.payload.2"]
    with pytest.raises(ValueError, match="missing"):
        payload_of(broken)


def test_receive_command_shuts_down_gracefully(tmp_path):
    import signal
    import sys

    gport, hport = free_port(), free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "dsa-otel")
    proc = subprocess.Popen([exe, "receive", "--out", str(tmp_path / "rx"), "--grpc-port", str(gport),
                             "--http-port", str(hport)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "OTLP/gRPC" in proc.stdout.readline()
        cfg = TraceConfig(out_dir=str(tmp_path / "t"), run_name="cli", exporters="otlp", otlp_protocol="grpc",
                          otlp_endpoint=f"http://127.0.0.1:{gport}", otlp_insecure=True, ring_slots=64)
        tracer = DSATracer(cfg)
        workload(tracer, n_requests=3, steps=2, layers=2)
        tracer.shutdown()
        assert tracer.tracing_stats()["export_errors"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "received" in out
    run = tmp_path / "rx" / "cli" / "block64"
    assert not [f for f in os.listdir(run) if f.endswith(".partial")]  # finalised on SIGTERM
    assert (run / "summary.json").is_file()
    assert len(list(read_records(str(run)))) == 3 * 2 * 2
