"""DSATracer: the public API the model / serving engine calls at points A-D.

Call pattern per decode step::

    tracer.start_request(rid, prompt_len)               # once per request (optional: auto on first step)
    tracer.record_prefix(rid, cached_blocks=3, ...)     # D, once at admission when the prefix cache hit
    for layer in layers:
        tracer.record_topk(layer_id, topk_idx, seq_lens, request_ids, block_table=bt)   # A (+B)
    tracer.end_step()                                   # one snapshot copy; statistics happen elsewhere
    tracer.end_request(rid)

Everything above is cheap and never waits: ``record_topk`` appends a reference, ``end_step`` issues one
``torch.cat`` (a device copy on CUDA) and hands it on. When the materializer is behind and all ``ring_slots`` are
in flight, the step is dropped and counted instead. With ``enabled=False`` every method returns at once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import structlog
import torch
from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter

from . import semconv as sc
from .capture import KVReport, SnapshotRing, StepCollector
from .config import ConfigError, TraceConfig
from .ids import RequestTraceIdGenerator, trace_id_for_request
from .kvfetch import TIER_FIELDS, KVFetchModel
from .materializer import Counters, Materializer, remote_parent_link
from .processor import NonBlockingBatchSpanProcessor

log = structlog.get_logger("dsa_otel.tracer")


class DSATracer:
    """Traces DSA top-k selections, KV blocks, fetch cost and prefix reuse as one OTel trace per request."""

    def __init__(
        self,
        config: TraceConfig | None = None,
        *,
        exporters: Sequence[SpanExporter] | None = None,
        kv_fetch_model: KVFetchModel | None = None,
        meter_provider: otel_metrics.MeterProvider | None = None,
        resource_attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Args:
            config: what to trace; ``TraceConfig.from_env()`` when omitted.
            exporters: span exporters to use instead of the ones ``config.exporters`` names (tests, custom sinks).
            kv_fetch_model: the engine's tier model for C (default: everything in HBM).
            meter_provider: where the drop / export counters are published (default: the global provider).
            resource_attributes: extra OTel resource attributes (e.g. host, engine version).
        """
        self.config = config if config is not None else TraceConfig.from_env()
        self.enabled = self.config.enabled
        self.counters = Counters()
        self._collector = StepCollector()
        self._closed = False
        self.processors: list[NonBlockingBatchSpanProcessor] = []
        if not self.enabled:
            return
        cfg = self.config
        self._slots = threading.BoundedSemaphore(cfg.capture_slots)
        self._ring = SnapshotRing()
        if cfg.worker == "process":
            if exporters is not None:
                raise ConfigError("worker='process' builds its exporters from the config inside the worker "
                                  "process; pass exporters= only with worker='thread'")
            from .worker import ProcessMaterializer  # local import: only process mode needs it

            self.provider = None  # spans are made in the worker, by an in-process pipeline built there
            self.materializer = ProcessMaterializer(cfg, kv_fetch_model, self.counters, self._slots.release,
                                                    self._ring.release, dict(resource_attributes or {}))
        else:
            self._build_in_process(exporters, kv_fetch_model, resource_attributes)
        self._register_metrics(meter_provider)

    def _build_in_process(self, exporters: Sequence[SpanExporter] | None, kv_fetch_model: KVFetchModel | None,
                          resource_attributes: Mapping[str, Any] | None) -> None:
        """TracerProvider, span processors, exporters and the materializer thread of this process."""
        cfg = self.config
        self.id_generator = RequestTraceIdGenerator()
        res = {"service.name": "dsa-otel", sc.RES_RUN_NAME: cfg.run_name, sc.RES_RANK: cfg.rank,
               sc.RES_WORLD_SIZE: cfg.world_size, sc.RES_KV_BLOCK_SIZE: cfg.kv_block_size,
               sc.RES_DETAIL: cfg.detail, sc.RES_DATASET: cfg.dataset}
        res.update(resource_attributes or {})
        self.provider = TracerProvider(resource=Resource.create(res), id_generator=self.id_generator)
        if exporters is None:
            from .exporters import build_exporters  # local import: the exporters package imports dsa_otel
            exporters = build_exporters(cfg, stats_provider=self.tracing_stats)
        for exp in exporters:
            if getattr(exp, "stats_provider", False) is None:  # exporters that write a summary get our counters
                exp.stats_provider = self.tracing_stats  # type: ignore[attr-defined]
            p = NonBlockingBatchSpanProcessor(exp, cfg.max_queue_size, cfg.max_export_batch_size,
                                              cfg.schedule_delay_ms)
            self.provider.add_span_processor(p)
            self.processors.append(p)
        self._otel_tracer = self.provider.get_tracer("dsa_otel")
        self.materializer = Materializer(cfg, self._otel_tracer, self.id_generator, kv_fetch_model, self.counters,
                                         self.is_sampled, self._slots.release, self._ring.release)
        # A lone in-process JSONL exporter takes each step's arrays directly; with any other exporter (OTLP,
        # in-memory, several sinks) the payload is serialised into the span attribute that they all read.
        sole = exporters[0] if len(exporters) == 1 else None
        self.materializer.embed_payload = not getattr(sole, "accepts_inprocess_payload", False)
        if not self.materializer.embed_payload:
            sole.payload_source = self.materializer.handoff.take  # type: ignore[union-attr]

    # ------------------------------------------------------------------ ids and sampling
    def trace_id(self, request_id: int | str) -> int:
        """The trace id of a request (deterministic, see dsa_otel.ids)."""
        return trace_id_for_request(self.config.run_name, request_id)

    def is_sampled(self, request_id: int | str) -> bool:
        """Per-request head sampling: a stable hash of (seed, request_id) against sample_rate."""
        rate = self.config.sample_rate
        if rate >= 1.0:
            return True
        if rate <= 0.0:
            return False
        # recomputed (about a microsecond) rather than cached: a long-running server sees unboundedly many ids
        h = hashlib.blake2b(f"{self.config.seed}:{request_id}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2.0 ** 64 < rate

    # ------------------------------------------------------------------ request lifecycle
    def start_request(self, request_id: int | str, prompt_len: int = 0, *,
                      attributes: Mapping[str, Any] | None = None, traceparent: str | None = None) -> bool:
        """Open the request's trace. ``traceparent`` (W3C) of a front-end span is attached as a span link, so
        the trace id stays the deterministic one. Returns whether the request is sampled."""
        if not self.enabled:
            return False
        link = remote_parent_link(traceparent) if traceparent else None
        self.materializer.submit(("start", request_id, time.time_ns(), int(prompt_len),
                                     dict(attributes) if attributes else None, link))
        return self.is_sampled(request_id)

    def record_prefix(self, request_id: int | str, cached_blocks: int, hit_tokens: int | None = None, *,
                      physical_block_ids: Sequence[int] | None = None, prefix_key: str | None = None) -> None:
        """D: the request's first ``cached_blocks`` KV blocks were reused from the prefix cache.

        ``physical_block_ids`` are the reused physical blocks (recorded on the prefill span); ``prefix_key`` is the
        cache's key for the matched prefix (e.g. the hash of its last block)."""
        if not self.enabled:
            return
        if cached_blocks < 0:
            raise ValueError("cached_blocks must be >= 0")
        hit = cached_blocks * self.config.kv_block_size if hit_tokens is None else int(hit_tokens)
        phys = list(physical_block_ids) if physical_block_ids is not None else None
        self.materializer.submit(("prefix", request_id, time.time_ns(), int(cached_blocks), hit, phys, prefix_key))

    def end_prefill(self, request_id: int | str) -> None:
        """Mark the end of the request's prefill (otherwise its first traced decode step does)."""
        if self.enabled:
            self.materializer.submit(("end_prefill", request_id, time.time_ns()))

    def end_request(self, request_id: int | str, attributes: Mapping[str, Any] | None = None) -> None:
        """Close the request's trace (latency figures such as TTFT can go in ``attributes``)."""
        if self.enabled:
            self.materializer.submit(("end", request_id, time.time_ns(), dict(attributes) if attributes else None))

    # ------------------------------------------------------------------ A, B, C
    def record_topk(self, layer_id: int | Sequence[int], topk_indices: torch.Tensor,
                    seq_lens: torch.Tensor | Sequence[int], request_ids: Sequence[int | str],
                    step: int | Sequence[int] | torch.Tensor | None = None, scores: torch.Tensor | None = None,
                    block_table: torch.Tensor | None = None) -> None:
        """A (+B): the indexer's top-k token positions of one layer (or of several layers at once) for a batch.

        Args:
            layer_id: the layer; or a sequence of L layer ids when ``topk_indices`` holds L layers ([L, B, K]),
                e.g. the static buffer a CUDA graph of the whole step writes: one call, one record per layer.
            topk_indices: [B, K] (or [K]; [L, B, K] with L layer ids) positions into each request's context;
                -1 or >= seq_len = padding.
            seq_lens: [B] tokens in context (the seed's ``end_pos``); tensor (any device) or ints.
            request_ids: B request ids (ints or strings); pass the same list object for every layer of a step.
            step: the decode position(s) (the seed's ``start_pos``); default ``seq_len - 1``.
            scores: indexer scores aligned with ``topk_indices`` (optional, same shape).
            block_table: [B, max_blocks] logical -> physical KV block ids of each request (optional, B).
        Nothing here waits for the device or copies per element; see capture.py for the contract.
        """
        if not self.enabled:
            return
        if topk_indices.is_floating_point():
            raise TypeError(f"topk_indices must hold integer positions, got {topk_indices.dtype}")
        if isinstance(layer_id, (int, np.integer)):
            layers: Sequence[int] = (int(layer_id),)
            if topk_indices.dim() == 1:
                topk_indices = topk_indices.unsqueeze(0)
                if scores is not None and scores.dim() == 1:
                    scores = scores.unsqueeze(0)
        else:
            layers = [int(x) for x in layer_id]
            if topk_indices.dim() != 3 or topk_indices.shape[0] != len(layers):
                raise ValueError(f"{len(layers)} layer ids need topk_indices of shape [{len(layers)}, B, K]; got "
                                 f"{tuple(topk_indices.shape)}")
        if scores is not None and scores.shape != topk_indices.shape:
            raise ValueError(f"scores {tuple(scores.shape)} do not match topk_indices {tuple(topk_indices.shape)}")
        self._collector.add(layers, topk_indices, seq_lens, request_ids, step, scores, block_table)

    def record_kv_fetch(self, layer_id: int, request_ids: Sequence[int | str], tier: str, *,
                        bytes_read: Sequence[float] | np.ndarray, read_ops: Sequence[float] | np.ndarray,
                        hit_blocks: Sequence[float] | np.ndarray, latency_us: Sequence[float] | np.ndarray) -> None:
        """C measured by the engine: one value per request of ``request_ids`` for this layer and tier.
        Host values only (call it where the engine already has them on the CPU)."""
        if not self.enabled:
            return
        vals = {"bytes_read": bytes_read, "read_ops": read_ops, "hit_blocks": hit_blocks, "latency_us": latency_us}
        arrays = {f: np.asarray(vals[f], dtype=np.float64).reshape(-1) for f in TIER_FIELDS}
        if any(a.size != len(request_ids) for a in arrays.values()):
            raise ValueError("record_kv_fetch needs one value per request for every field")
        self._collector.kv_reports.append(KVReport(layer_id, request_ids, tier, arrays))

    def end_step(self, phase: str = "decode") -> bool:
        """Close the step: snapshot its selections with one copy and queue them. Returns False if the step was
        dropped (materializer behind) or empty."""
        if not self.enabled:
            return False
        col = self._collector
        if not len(col):
            col.reset()
            return False
        if self.config.sample_rate < 1.0 and not any(
                self.is_sampled(rid) for g in col.groups for rid in g.request_ids):
            col.reset()
            return False
        self.materializer.poll()  # process worker: take back the slots the worker has finished with
        if not self._slots.acquire(blocking=False):
            self.counters.steps_dropped += 1
            col.reset()
            return False
        try:
            col.phase = phase
            cap = col.snapshot(self._ring)
        except Exception:
            self._slots.release()
            col.reset()
            raise
        col.reset()
        self.materializer.submit(("step", cap))
        return True

    # ------------------------------------------------------------------ flushing
    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait (bounded) until everything recorded so far is exported. Returns False on timeout."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout_s
        done = threading.Event()
        self.materializer.submit(("flush", done))
        ok = done.wait(timeout_s) and getattr(self.materializer, "alive", True)
        for p in self.processors:
            left = max(0.0, deadline - time.monotonic())
            ok = p.force_flush(int(left * 1000)) and ok
        return ok

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """End open requests, flush (bounded), and close the exporters (writes summary.json)."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        done = threading.Event()
        self.materializer.submit(("stop", done))
        if not done.wait(timeout_s):
            log.warning("materializer did not finish in time; pending steps are lost", timeout_s=timeout_s)
        for p in self.processors:
            left = max(0.1, deadline - time.monotonic())
            p.shutdown(int(left * 1000))

    def __enter__(self) -> "DSATracer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ observability of the tracer itself
    def tracing_stats(self) -> dict[str, int]:
        """Counters of the pipeline: steps captured / dropped / failed, spans dropped / exported, export errors."""
        if self.enabled and self.config.worker == "process":
            out = self.materializer.stats()
            out["pid"] = os.getpid()
            return out
        out = self.counters.as_dict()
        for p in self.processors:
            for k, v in p.counters().items():
                out[f"{p.name}.{k}"] = v
        out["spans_dropped"] = sum(p.dropped for p in self.processors)
        out["export_errors"] = sum(p.export_errors for p in self.processors)
        out["pid"] = os.getpid()
        return out

    def _register_metrics(self, meter_provider: otel_metrics.MeterProvider | None) -> None:
        meter = (meter_provider.get_meter("dsa_otel") if meter_provider is not None
                 else otel_metrics.get_meter("dsa_otel"))

        def counter(name: str, key: str, desc: str) -> None:
            def cb(_: CallbackOptions) -> Iterable[Observation]:
                yield Observation(self.tracing_stats().get(key, 0), {"dsa.run_name": self.config.run_name,
                                                                     "dsa.rank": self.config.rank})
            meter.create_observable_counter(name, callbacks=[cb], description=desc)

        counter("dsa_otel.steps.captured", "steps_captured", "decode steps turned into spans")
        counter("dsa_otel.steps.dropped", "steps_dropped", "steps dropped because the capture ring was full")
        counter("dsa_otel.steps.failed", "steps_failed", "steps whose materialisation raised")
        counter("dsa_otel.spans.dropped", "spans_dropped", "spans dropped because an export queue was full")
        counter("dsa_otel.export.errors", "export_errors", "failed export batches")
