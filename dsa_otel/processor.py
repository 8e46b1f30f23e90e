"""A batching span processor that never makes the caller wait.

OpenTelemetry's ``BatchSpanProcessor`` also drops on a full queue, but its ``force_flush`` and ``shutdown`` share
one export lock with the worker, so a hung exporter (a dead collector with a long timeout) stalls whoever flushes.
This processor:

* ``on_end`` appends to a bounded deque under a short lock; when the queue is full the span is dropped and counted
  (``dropped``); it never blocks and never raises;
* one worker thread exports batches of ``max_export_batch_size`` every ``schedule_delay`` or as soon as a batch
  is full; an exporter exception is caught, logged, counted (``export_errors``) and the worker carries on;
* ``force_flush(timeout)`` waits at most ``timeout`` for the queue to drain and reports whether it did;
* ``shutdown`` flushes (bounded), stops the worker and shuts the exporter down;
* across ``fork`` the child gets a fresh lock, an empty queue and its own worker (the parent's thread does not
  exist in the child), so a forked data-loader worker can keep tracing.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from typing import Callable

import structlog
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = structlog.get_logger("dsa_otel.processor")


class NonBlockingBatchSpanProcessor(SpanProcessor):
    def __init__(
        self,
        exporter: SpanExporter,
        max_queue_size: int = 4096,
        max_export_batch_size: int = 256,
        schedule_delay_ms: int = 200,
        name: str = "",
    ) -> None:
        if max_queue_size < 1 or not 1 <= max_export_batch_size <= max_queue_size:
            raise ValueError("need 1 <= max_export_batch_size <= max_queue_size")
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = max_export_batch_size
        self.schedule_delay = schedule_delay_ms / 1000.0
        self.name = name or type(exporter).__name__
        self.dropped = 0
        self.exported = 0
        self.export_errors = 0
        self.failed_spans = 0
        self._init_state()
        if hasattr(os, "register_at_fork"):
            ref = weakref.WeakMethod(self._after_fork_in_child)
            os.register_at_fork(after_in_child=lambda: (ref() or (lambda: None))())

    # ------------------------------------------------------------------ lifecycle
    def _init_state(self) -> None:
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._pending_exports = 0
        self._flush_requested = False
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name=f"dsa-otel-export-{self.name}", daemon=True)
        self._worker.start()

    def _after_fork_in_child(self) -> None:
        self.dropped = self.exported = self.export_errors = self.failed_spans = 0
        self._init_state()

    # ------------------------------------------------------------------ SpanProcessor API
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopped:
            self.dropped += 1
            return
        with self._cond:
            if len(self._queue) >= self.max_queue_size:
                self.dropped += 1
                return
            self._queue.append(span)
            if len(self._queue) >= self.max_export_batch_size:
                self._cond.notify()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        deadline = time.monotonic() + timeout_millis / 1000.0
        with self._cond:
            self._flush_requested = True
            self._cond.notify()
            while self._queue or self._pending_exports:
                left = deadline - time.monotonic()
                if left <= 0 or not self._worker.is_alive():
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def shutdown(self, timeout_millis: int = 30000) -> None:
        if self._stopped:
            return
        flushed = self.force_flush(timeout_millis)
        with self._cond:
            self._stopped = True
            if not flushed:
                self.dropped += len(self._queue)
                self._queue.clear()
            self._cond.notify_all()
        self._worker.join(timeout=max(0.1, timeout_millis / 1000.0))
        try:
            self.exporter.shutdown()
        except Exception as exc:  # an exporter failing at shutdown must not take the program down
            self.export_errors += 1
            log.warning("exporter shutdown failed", exporter=self.name, error=repr(exc))

    def counters(self) -> dict[str, int]:
        return {"spans_dropped": self.dropped, "spans_exported": self.exported,
                "export_errors": self.export_errors, "spans_failed": self.failed_spans,
                "queue_depth": len(self._queue)}

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._stopped and not self._flush_requested:
                    self._cond.wait(self.schedule_delay)
                if self._stopped and not self._queue:
                    return
                if not self._queue:
                    self._flush_requested = False
                    self._cond.notify_all()
                    continue
                n = min(len(self._queue), self.max_export_batch_size)
                batch = [self._queue.popleft() for _ in range(n)]
                self._pending_exports += 1
            try:
                self._export(batch)
            finally:
                with self._cond:
                    self._pending_exports -= 1
                    self._cond.notify_all()

    def _export(self, batch: list[ReadableSpan]) -> None:
        try:
            result = self.exporter.export(batch)
        except Exception as exc:
            self.export_errors += 1
            self.failed_spans += len(batch)
            log.warning("span export raised", exporter=self.name, spans=len(batch), error=repr(exc))
            return
        if result == SpanExportResult.SUCCESS:
            self.exported += len(batch)
        else:
            self.export_errors += 1
            self.failed_spans += len(batch)
            log.warning("span export failed", exporter=self.name, spans=len(batch))


ProcessorFactory = Callable[[SpanExporter], NonBlockingBatchSpanProcessor]
