"""The caller never waits on export: slow, raising and hung exporters cost drops, not latency."""

import os
import threading
import time

import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.processor import NonBlockingBatchSpanProcessor


class SlowExporter(SpanExporter):
    def __init__(self, delay=0.5, raise_every=0):
        self.delay, self.raise_every, self.calls, self.spans = delay, raise_every, 0, 0

    def export(self, spans):
        self.calls += 1
        time.sleep(self.delay)
        if self.raise_every and self.calls % self.raise_every == 0:
            raise RuntimeError("collector exploded")
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


class HungExporter(SpanExporter):
    def __init__(self):
        self.gate = threading.Event()

    def export(self, spans):
        self.gate.wait(30)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self.gate.set()


def test_on_end_never_blocks_and_counts_drops():
    exp = HungExporter()
    proc = NonBlockingBatchSpanProcessor(exp, max_queue_size=50, max_export_batch_size=10, schedule_delay_ms=10)
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    worst = 0.0
    for i in range(2000):
        t0 = time.perf_counter()
        tracer.start_span(f"s{i}").end()
        worst = max(worst, time.perf_counter() - t0)
    assert worst < 0.05  # the exporter is hung for 30 s; each span still costs microseconds
    assert proc.dropped >= 2000 - 50 - 10
    t0 = time.perf_counter()
    assert proc.force_flush(200) is False  # bounded, reports the failure
    assert time.perf_counter() - t0 < 1.0
    exp.gate.set()
    proc.shutdown(2000)


def test_exporter_exceptions_are_survived_and_counted():
    exp = SlowExporter(delay=0.0, raise_every=2)
    proc = NonBlockingBatchSpanProcessor(exp, max_queue_size=1000, max_export_batch_size=5, schedule_delay_ms=5)
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    for i in range(40):
        tracer.start_span(f"s{i}").end()
        if i % 5 == 4:
            assert proc.force_flush(2000)
    assert proc.export_errors >= 3 and proc.exported + proc.failed_spans == 40
    assert exp.spans == proc.exported
    proc.shutdown()


def test_tracer_with_slow_exporter_keeps_the_model_fast(tmp_path):
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="slow", max_queue_size=8, max_export_batch_size=4,
                      schedule_delay_ms=1, kv_block_size=16)
    slow = SlowExporter(delay=0.3)
    tracer = DSATracer(cfg, exporters=[slow])
    worst = 0.0
    rids = list(range(4))
    for step in range(60):
        t0 = time.perf_counter()
        for layer in range(4):
            tracer.record_topk(layer, torch.randint(0, 500, (4, 64)), torch.full((4,), 500), rids)
        tracer.end_step()
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.002)  # a model step
    t0 = time.perf_counter()
    tracer.shutdown(timeout_s=1.0)
    assert time.perf_counter() - t0 < 5.0
    assert worst < 0.1
    stats = tracer.tracing_stats()
    assert stats["spans_dropped"] + stats["steps_dropped"] > 0  # the loss is visible, not silent


def test_fork_child_gets_a_working_processor():
    exp = SlowExporter(delay=0.0)
    proc = NonBlockingBatchSpanProcessor(exp, max_queue_size=100, max_export_batch_size=10, schedule_delay_ms=5)
    provider = TracerProvider()
    provider.add_span_processor(proc)
    tracer = provider.get_tracer("t")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the parent's worker thread does not exist here
        try:
            for i in range(20):
                tracer.start_span(f"c{i}").end()
            ok = proc.force_flush(5000)
            os.write(w, f"{int(ok)},{exp.spans},{proc.dropped}".encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    ok, spans, dropped = map(int, os.read(r, 100).decode().split(","))
    assert ok == 1 and spans == 20 and dropped == 0
    proc.shutdown()
