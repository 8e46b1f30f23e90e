"""Sharded JSONL exporter: the seed's file layout, written safely.

Layout (``run_dir`` = ``<out_dir>/<run_name>/block<kv_block_size>[/rank<r>]``)::

    run_dir/run_meta.json                        written atomically at start
    run_dir/trace_steps_<a>_<b>.jsonl            requests a..b (b = a + max_requests_per_file - 1)
    run_dir/trace_steps_<a>_<b>.jsonl.partial    the same while still open
    run_dir/summary.json                         rewritten atomically when a shard closes and at shutdown

* shard = request_id // max_requests_per_file, so a request never spans two files whatever the batching;
* each export batch is appended to a shard with a single ``write`` of whole lines; a crash can at worst leave an
  unterminated last line, which readers skip and ``recover_run`` trims;
* a shard is finalised (fsync, then atomic rename from ``.partial``) as soon as all its requests have ended, and
  at shutdown; a finalised shard is never written again (a request ending after its shard closed is appended to
  ``trace_steps_<a>_<b>.late-<n>.jsonl`` rather than reopening it);
* with ``compression="zstd"`` every batch is one zstd frame, so a crash loses at most the frame being written;
* a failing disk (ENOSPC, EIO) fails the batch, which the processor counts; files already written stay valid.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import orjson
import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from dsa_otel import semconv as sc
from dsa_otel.config import TraceConfig
from dsa_otel.summary import SummaryAccumulator

from .records import payload_of, step_records

log = structlog.get_logger("dsa_otel.jsonl")

RUN_META_SCHEMA_VERSION = 1
COMPLETED_LOG = "completed_requests.jsonl"  # one {"request_id": N} line per request whose records are all written
_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE


def atomic_write_json(path: str, obj: Any) -> None:
    """Write JSON to ``path`` so readers see the old or the new file, never a torn one."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(shard: int, width: int, compression: str = "none") -> str:
    a = shard * width
    return f"trace_steps_{a}_{a + width - 1}.jsonl" + (".zst" if compression == "zstd" else "")


class _Shard:
    def __init__(self, path: str, compression: str) -> None:
        self.final_path = path
        self.path = path + ".partial"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.compressor = None
        if compression == "zstd":
            import zstandard  # optional dependency, checked at exporter construction

            self.compressor = zstandard.ZstdCompressor(level=3)
        self.lines = 0

    def append(self, data: bytes, n_lines: int) -> None:
        if self.compressor is not None:
            data = self.compressor.compress(data)
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        self.lines += n_lines

    def finalize(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.path, self.final_path)


class ShardedJsonlExporter(SpanExporter):
    """A real OTel ``SpanExporter`` writing the seed's sharded JSONL layout."""

    def __init__(self, config: TraceConfig, stats_provider: Callable[[], Mapping[str, Any]] | None = None,
                 run_dir: str | None = None) -> None:
        self.config = config
        self.run_dir = run_dir or config.run_dir
        self.width = config.max_requests_per_file
        self.stats_provider = stats_provider
        self.payload_source: Callable[[int], Any] | None = None  # set by DSATracer: decoded payload by span id
        self.completion_log = bool(config.extra.get("completion_log", False))
        if config.compression == "zstd":
            import zstandard  # noqa: F401  (fail early with a clear ImportError)
        os.makedirs(self.run_dir, exist_ok=True)
        self.summary = SummaryAccumulator()
        # None in each of several worker processes: their traced process merges the summaries and writes the file
        self.summary_file: str | None = "summary.json"
        self.shards: dict[int, _Shard] = {}
        self.closed_shards: set[int] = set()
        self.ended: dict[int, set[int]] = {}
        self.late_files = 0
        self.lines_written = 0
        self.bytes_written = 0
        self.decode_errors = 0
        self._lock = threading.Lock()
        self._shutdown = False
        self.write_run_meta()

    # ------------------------------------------------------------------ metadata
    def write_run_meta(self) -> None:
        c = self.config
        meta = {
            "schema_version": RUN_META_SCHEMA_VERSION,
            "created_at_ms": int(time.time() * 1000),
            "run_name": c.run_name,
            "dataset": c.dataset,
            "rank": c.rank,
            "world_size": c.world_size,
            "block_size_tokens": c.kv_block_size,
            "max_requests_per_file": c.max_requests_per_file,
            "detail": c.detail,
            "compression": c.compression,
            "writer": "dsa-otel",
            "config": c.to_json(),
        }
        path = os.path.join(self.run_dir, "run_meta.json")
        if os.path.exists(path):  # resumed run: keep the original creation time, record the resume
            try:
                with open(path, "rb") as f:
                    old = json.load(f)
                meta["created_at_ms"] = old.get("created_at_ms", meta["created_at_ms"])
                meta["resumed_at_ms"] = old.get("resumed_at_ms", []) + [int(time.time() * 1000)]
                for k, v in old.items():
                    meta.setdefault(k, v)
            except (OSError, ValueError):
                pass
        atomic_write_json(path, meta)

    def summary_counters(self) -> dict[str, int]:
        """This writer's own counters, as they appear in summary.json's ``tracing`` section."""
        return {"jsonl_lines_written": self.lines_written, "jsonl_bytes_written": self.bytes_written,
                "jsonl_decode_errors": self.decode_errors, "jsonl_late_files": self.late_files}

    def write_summary(self) -> None:
        if self.summary_file is None:
            return
        tracing = dict(self.stats_provider()) if self.stats_provider else {}
        tracing.update(self.summary_counters())
        atomic_write_json(os.path.join(self.run_dir, self.summary_file), self.summary.to_json(tracing))

    # ------------------------------------------------------------------ export
    #: the tracer may hand step payloads over as objects on the span instead of serialising them
    accepts_inprocess_payload = True

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        take = self.payload_source
        items = [(s.name, s.attributes or {}, s.context.trace_id if s.context else 0,
                  take(s.context.span_id) if (take is not None and s.context is not None) else None) for s in spans]
        return self.write_spans(items)

    def write_spans(self, items: Sequence[tuple]) -> SpanExportResult:
        """Write (span name, attributes, trace id[, decoded payload]) tuples; the OTLP receiver calls this too."""
        with self._lock:
            if self._shutdown:
                return SpanExportResult.FAILURE
            per_shard: dict[int, list[bytes]] = {}
            per_shard_lines: dict[int, int] = {}
            finished: list[int] = []
            for item in items:
                name, attrs, trace_id = item[0], item[1], item[2]
                if name in (sc.SPAN_DECODE_STEP, "dsa.prefill_chunk"):
                    try:
                        p = item[3] if len(item) > 3 and item[3] is not None else payload_of(attrs)
                        recs = step_records(attrs, trace_id, p)
                    except (ValueError, KeyError) as exc:
                        self.decode_errors += 1
                        log.warning("undecodable step span skipped", error=repr(exc))
                        continue
                    if name == sc.SPAN_DECODE_STEP:
                        self.summary.add_step(attrs, p)
                    rid = int(attrs[sc.REQUEST_ID])
                    shard = rid // self.width
                    buf = per_shard.setdefault(shard, [])
                    buf.extend(orjson.dumps(r, option=_ORJSON_OPTS) for r in recs)
                    per_shard_lines[shard] = per_shard_lines.get(shard, 0) + len(recs)
                elif name == sc.SPAN_REQUEST:
                    self.summary.add_request_end(attrs)
                    finished.append(int(attrs.get(sc.REQUEST_ID, -1)))
                elif name == sc.SPAN_PREFILL:
                    self.summary.add_prefill(attrs)
            try:
                for shard, lines in per_shard.items():
                    data = b"".join(lines)
                    self._shard(shard).append(data, per_shard_lines[shard])
                    self.lines_written += per_shard_lines[shard]
                    self.bytes_written += len(data)
                if finished and self.completion_log:
                    # after this batch's lines are written: these requests are complete on disk (resume skips them)
                    data = b"".join(orjson.dumps({"request_id": rid}) + b"\n" for rid in finished if rid >= 0)
                    fd = os.open(os.path.join(self.run_dir, COMPLETED_LOG), os.O_WRONLY | os.O_CREAT | os.O_APPEND,
                                 0o644)
                    try:
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                closed_any = False
                for rid in finished:
                    if rid < 0:
                        continue
                    shard = rid // self.width
                    done = self.ended.setdefault(shard, set())
                    done.add(rid)
                    if len(done) >= self.width and shard in self.shards:
                        self.shards.pop(shard).finalize()
                        self.closed_shards.add(shard)
                        self.ended.pop(shard, None)
                        closed_any = True
                if closed_any:
                    self.write_summary()
            except OSError as exc:  # full disk, I/O error: this batch is lost, the files stay line-valid
                log.error("JSONL write failed; batch dropped", error=repr(exc), run_dir=self.run_dir)
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _shard(self, shard: int) -> _Shard:
        s = self.shards.get(shard)
        if s is None:
            name = shard_name(shard, self.width, self.config.compression)
            if shard in self.closed_shards or os.path.exists(os.path.join(self.run_dir, name)):
                self.late_files += 1
                stem, ext = name.split(".jsonl", 1)
                name = f"{stem}.late-{self.late_files}.jsonl{ext}"
            s = self.shards[shard] = _Shard(os.path.join(self.run_dir, name), self.config.compression)
        return s

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            for shard in list(self.shards):
                try:
                    self.shards.pop(shard).finalize()
                except OSError as exc:
                    log.error("could not finalise shard", shard=shard, error=repr(exc))
            try:
                self.write_summary()
            except OSError as exc:
                log.error("could not write summary.json", error=repr(exc))
