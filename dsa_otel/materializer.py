"""Background side of tracing: turn step snapshots into statistics, payloads and OpenTelemetry spans.

One daemon thread consumes messages in the order the model thread produced them (request start, prefix info,
step snapshots, request end), so span parenting and the tier model's state are deterministic. For CUDA
snapshots it launches the statistics on its own side stream after the snapshot's event and copies the results to
pinned host memory; only this thread ever waits on the GPU. For CPU snapshots the same tensor functions run here,
with the GIL released inside torch. Any failure is logged and counted; the thread never dies of it.
"""

from __future__ import annotations

import base64
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import structlog
import torch
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

from . import semconv as sc
from .capture import StepCapture
from .config import TraceConfig
from .ids import RequestTraceIdGenerator, request_low_bits, run_trace_prefix
from .kvfetch import TIER_FIELDS, FetchBatch, HBMOnlyFetchModel, KVFetchModel
from .stats import OFFSET_HIST_MBITS, Workspace, offset_bucket_bounds, selection_statistics
from .wire import Ragged, StepPayload, encode_step_payload

log = structlog.get_logger("dsa_otel.materializer")

HOT_PREFIX_TOP = 20


class PayloadHandoff:
    """Decoded step payloads by span id, for in-process exporters (the SDK gives processors a copy of each span,
    so the arrays cannot ride on the span object). Bounded FIFO: spans dropped by a full export queue cannot leak
    their payloads; the capacity exceeds what the export queues can hold."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: dict[int, Any] = {}
        self._lock = threading.Lock()

    def put(self, span_id: int, payload: Any) -> None:
        with self._lock:
            self._items[span_id] = payload
            while len(self._items) > self.capacity:
                del self._items[next(iter(self._items))]

    def take(self, span_id: int) -> Any:
        with self._lock:
            return self._items.pop(span_id, None)


@dataclass
class RequestState:
    request_id: int
    key: str | None
    span: Any
    context: Context
    span_context: SpanContext
    t_start_ns: int
    prompt_len: int
    prefix_blocks: int = 0
    prefix_hit_tokens: int = 0
    prefix_key: str = ""
    prefix_physical: list[int] = field(default_factory=list)
    prefill_open: bool = True
    steps: int = 0
    hot_prefix: np.ndarray | None = None


@dataclass
class Counters:
    steps_captured: int = 0
    steps_dropped: int = 0
    steps_failed: int = 0
    rows_traced: int = 0
    requests_started: int = 0
    requests_sampled_out: int = 0
    requests_ended: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Materializer:
    def __init__(self, config: TraceConfig, tracer: otel_trace.Tracer, id_gen: RequestTraceIdGenerator,
                 kv_fetch_model: KVFetchModel | None, counters: Counters,
                 is_sampled: Callable[[int | str], bool], release_slot: Callable[[], None],
                 release_buffer: Callable[[Any], None] = lambda buf: None) -> None:
        self.config = config
        self.tracer = tracer
        self.id_gen = id_gen
        self.kv_model: KVFetchModel = kv_fetch_model or HBMOnlyFetchModel(
            config.kv_bytes_per_token, config.hbm_bandwidth_gbps, config.hbm_op_latency_us)
        self.counters = counters
        self.is_sampled = is_sampled
        self.embed_payload = True  # the tracer clears it when every exporter takes the in-process payload
        self.handoff = PayloadHandoff(capacity=4 * (config.max_queue_size + config.max_export_batch_size))
        self.release_slot = release_slot
        self.release_buffer = release_buffer
        self.requests: dict[int | str, RequestState] = {}
        self.unsampled: set[int | str] = set()
        self.next_int_id = 0
        self.string_ids: dict[str, int] = {}
        # one of several worker processes numbers string ids only inside the shards it owns (one writer per file)
        self.owns_int_id: Callable[[int], bool] = lambda int_id: True
        # The SDK's tracer: step spans are built finished and handed to its span processor (_emit_step_span)
        self._span_processor = getattr(tracer, "span_processor", None)
        self._bucket_ids = offset_bucket_bounds(OFFSET_HIST_MBITS)[0]
        self._workspace = Workspace()
        self._streams: dict[torch.device, Any] = {}
        self.trace_prefix = run_trace_prefix(config.run_name)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="dsa-otel-materializer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ input
    def submit(self, msg: tuple) -> None:
        """Hand a message to the materializer thread (never blocks)."""
        self.queue.put(msg)

    def poll(self) -> None:
        """Nothing to collect here: this thread releases each ring slot itself when it is done with a step."""

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while True:
            msg = self.queue.get()
            kind = msg[0]
            if kind == "stop":
                self._end_all(time.time_ns())
                msg[1].set()
                return
            try:
                if kind == "step":
                    self._on_step(msg[1])
                elif kind == "start":
                    self._on_start(*msg[1:])
                elif kind == "prefix":
                    self._on_prefix(*msg[1:])
                elif kind == "end_prefill":
                    self._on_end_prefill(*msg[1:])
                elif kind == "end":
                    self._on_end(*msg[1:])
                elif kind == "flush":
                    msg[1].set()
            except Exception as exc:  # tracing must never take the model down
                if kind == "step":
                    self.counters.steps_failed += 1
                log.exception("materializer failed on a message", kind=kind, error=repr(exc))
            finally:
                if kind == "step":
                    self.release_buffer(msg[1].buffer)
                    msg[1].indices = msg[1].buffer = None
                    self.release_slot()

    # ------------------------------------------------------------------ requests
    def _int_id(self, rid: int | str) -> int:
        if isinstance(rid, (int, np.integer)) and not isinstance(rid, bool):
            return int(rid)
        got = self.string_ids.get(rid)  # type: ignore[arg-type]
        if got is None:
            while self.next_int_id in self.requests or not self.owns_int_id(self.next_int_id):
                self.next_int_id += 1
            got = self.string_ids[rid] = self.next_int_id  # type: ignore[index]
            self.next_int_id += 1
        return got

    def _on_start(self, rid: int | str, t_ns: int, prompt_len: int, attrs: dict | None,
                  link: SpanContext | None) -> RequestState | None:
        if rid in self.requests:
            return self.requests[rid]
        if not self.is_sampled(rid):
            self.unsampled.add(rid)
            self.counters.requests_sampled_out += 1
            return None
        int_id = self._int_id(rid)
        key = rid if isinstance(rid, str) else None
        a: dict[str, Any] = {sc.REQUEST_ID: int_id, sc.PROMPT_LEN: int(prompt_len), sc.RANK: self.config.rank}
        if key is not None:
            a[sc.REQUEST_KEY] = key
        if self.config.dataset:
            a[sc.RES_DATASET] = self.config.dataset
        if attrs:
            a.update(attrs)
        self.id_gen.pin_next_trace_id((self.trace_prefix << 64) | request_low_bits(rid))
        links = [Link(link)] if link is not None else ()
        span = self.tracer.start_span(sc.SPAN_REQUEST, context=Context(), attributes=a, start_time=t_ns,
                                      links=links)
        st = RequestState(request_id=int_id, key=key, span=span, context=otel_trace.set_span_in_context(span),
                          span_context=span.get_span_context(), t_start_ns=t_ns, prompt_len=int(prompt_len))
        self.requests[rid] = st
        self.counters.requests_started += 1
        return st

    def _on_prefix(self, rid: int | str, t_ns: int, cached_blocks: int, hit_tokens: int,
                   physical: Sequence[int] | None, prefix_key: str | None) -> None:
        st = self.requests.get(rid) or self._on_start(rid, t_ns, -1, None, None)
        if st is None:
            return
        st.prefix_blocks = int(cached_blocks)
        st.prefix_hit_tokens = int(hit_tokens)
        st.prefix_key = prefix_key or ""
        st.prefix_physical = [int(x) for x in physical] if physical is not None else []
        st.hot_prefix = np.zeros(st.prefix_blocks, dtype=np.int64) if st.prefix_blocks > 0 else None

    def _prefix_attrs(self, st: RequestState) -> dict[str, Any]:
        return {sc.PREFIX_HIT: st.prefix_blocks > 0, sc.PREFIX_CACHED_BLOCKS: st.prefix_blocks,
                sc.PREFIX_HIT_TOKENS: st.prefix_hit_tokens, sc.PREFIX_KEY: st.prefix_key}

    def _close_prefill(self, st: RequestState, t_ns: int) -> None:
        if not st.prefill_open:
            return
        st.prefill_open = False
        a = {sc.REQUEST_ID: st.request_id, sc.PROMPT_LEN: st.prompt_len, sc.RANK: self.config.rank,
             **self._prefix_attrs(st)}
        if st.prefix_physical:
            a[sc.PREFIX_PHYSICAL_BLOCKS] = st.prefix_physical[:4096]
        span = self.tracer.start_span(sc.SPAN_PREFILL, context=st.context, attributes=a, start_time=st.t_start_ns)
        span.end(end_time=max(t_ns, st.t_start_ns))

    def _on_end_prefill(self, rid: int | str, t_ns: int) -> None:
        st = self.requests.get(rid)
        if st is not None:
            self._close_prefill(st, t_ns)

    def _on_end(self, rid: int | str, t_ns: int, attrs: dict | None) -> None:
        st = self.requests.pop(rid, None)
        if st is None:
            self.unsampled.discard(rid)
            return
        self._close_prefill(st, t_ns)
        a: dict[str, Any] = {sc.STEPS_TRACED: st.steps}
        if st.hot_prefix is not None and st.hot_prefix.any():
            order = np.argsort(-st.hot_prefix, kind="stable")[:HOT_PREFIX_TOP]
            order = order[st.hot_prefix[order] > 0]
            a[sc.HOT_PREFIX_BLOCKS] = [int(b) for b in order]
            a[sc.HOT_PREFIX_TOUCHES] = [int(c) for c in st.hot_prefix[order]]
        if attrs:
            a.update(attrs)
        st.span.set_attributes(a)
        st.span.end(end_time=max(t_ns, st.t_start_ns))
        self.counters.requests_ended += 1

    def _end_all(self, t_ns: int) -> None:
        for rid in list(self.requests):
            try:
                self._on_end(rid, t_ns, {"dsa.ended_by": "shutdown"})
            except Exception as exc:
                log.warning("could not end request at shutdown", request=str(rid), error=repr(exc))

    # ------------------------------------------------------------------ steps
    def _stream(self, dev: torch.device) -> Any:
        return side_stream(self._streams, dev)

    def _on_step(self, cap: StepCapture) -> None:
        cfg = self.config
        groups = cap.groups
        # requests of the step, in first-seen order; every selection row maps to one
        req_index: dict[int | str, int] = {}
        req_list: list[RequestState | None] = []
        group_req: list[np.ndarray] = []
        for g in groups:
            idx = np.empty(len(g.request_ids), dtype=np.int64)
            for b, rid in enumerate(g.request_ids):
                j = req_index.get(rid)
                if j is None:
                    j = req_index[rid] = len(req_list)
                    st = self.requests.get(rid)
                    if st is None and rid not in self.unsampled:
                        st = self._on_start(rid, cap.t_start_ns, -1, None, None)
                    req_list.append(st)
                idx[b] = j
            group_req.append(idx)
        if not any(st is not None for st in req_list):
            return
        self._groups_to_host(cap)
        n_rec = cap.layer_ids.size
        sizes = cap.batch_sizes
        rec_group = cap.record_group
        row_record = np.repeat(np.arange(n_rec), sizes)
        row_bpos = np.arange(row_record.size) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        row_group = rec_group[row_record]
        row_req = np.concatenate([group_req[rec_group[i]][: sizes[i]] for i in range(n_rec)])
        R = row_req.size
        if R != cap.indices.shape[0]:
            raise ValueError(f"step has {cap.indices.shape[0]} selection rows but request lists cover {R}")
        # group rows by request (stable: layers stay in recording order) so each request is one contiguous slab
        perm = np.argsort(row_req, kind="stable")
        row_req, row_record, row_bpos, row_group = row_req[perm], row_record[perm], row_bpos[perm], row_group[perm]
        row_layer = cap.layer_ids[row_record]
        bounds = np.searchsorted(row_req, np.arange(len(req_list) + 1))

        seq_rows = self._per_row(groups, [g.seq_lens for g in groups], row_group, row_bpos)
        prefix_req = np.array([st.prefix_blocks if st is not None else 0 for st in req_list], dtype=np.int64)
        tables = [g.block_table for g in groups]
        table_np, table_rows = None, None
        if all(t is not None for t in tables):
            width = max(t.shape[1] for t in tables)  # type: ignore[union-attr]
            host_tables = [_host(t) for t in tables]
            table_np = host_tables[0] if len(host_tables) == 1 else np.concatenate(
                [np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=-1) for t in host_tables])
            base = np.cumsum([0] + [t.shape[0] for t in tables])[:-1]  # type: ignore[union-attr]
            table_rows = base[row_group] + row_bpos

        pos_np, scores_np = self._sorted_rows(cap, perm)
        st_all = selection_statistics(pos_np, seq_rows, cfg.kv_block_size, prefix_blocks=prefix_req[row_req],
                                      block_table=table_np, block_table_rows=table_rows, scores_sorted=scores_np,
                                      row_group=row_req, n_groups=len(req_list), workspace=self._workspace)
        columns = st_all.columns
        col = {c: i for i, c in enumerate(columns)}
        stats_np = st_all.matrix
        unique_blocks = st_all.block_lengths
        phys = st_all.physical_ids
        fetch = FetchBatch(
            request_ids=list(req_index), row_request=row_req, layer_ids=row_layer,
            tokens=stats_np[:, col["unique_token_pos_count"]].astype(np.int64), unique_blocks=unique_blocks,
            block_runs=stats_np[:, col["physical_block_runs" if phys is not None else "block_runs"]].astype(np.int64),
            blocks=Ragged(values=phys if phys is not None else st_all.block_ids, lengths=unique_blocks),
            physical=phys is not None, block_size=cfg.kv_block_size)
        tiers = self.kv_model.account(fetch)
        tiers = self._apply_kv_reports(tiers, cap, row_layer, row_req, req_index, R)
        tier_cols: list[str] = []
        tier_data: list[np.ndarray] = []
        for tier in sorted(tiers):
            for f in TIER_FIELDS:
                tier_cols.append(f"kv_fetch.{tier}.{f}")
                tier_data.append(np.asarray(tiers[tier][f], dtype=np.float64).reshape(R))
        all_columns = columns + tuple(tier_cols)
        matrix = np.concatenate([stats_np, np.stack(tier_data, 1)], 1) if tier_data else stats_np

        step_rows = None
        if any(g.steps is not None for g in groups):
            step_rows = self._per_row(groups, [g.steps for g in groups], row_group, row_bpos)
        blk_off = np.concatenate(([0], np.cumsum(unique_blocks)))
        pos_off = np.concatenate(([0], np.cumsum(st_all.valid_lengths)))
        flat_pos = pos_np[st_all.valid_mask] if cfg.wants_positions else None
        flat_scores = scores_np[st_all.valid_mask].astype(np.float16) \
            if (cfg.wants_positions and cfg.store_scores and scores_np is not None) else None
        hist = st_all.offset_hist
        if hist is not None:  # each request's non-empty offset buckets, found for all requests at once
            hist_req, hist_col = np.nonzero(hist)
            hist_buckets, hist_counts = self._bucket_ids[hist_col], hist[hist_req, hist_col]
            hist_cut = np.searchsorted(hist_req, np.arange(hist.shape[0] + 1)).tolist()
        # per-request span attributes (means, maxima, bytes per tier) for all requests at once, not per request
        seg_start = bounds[:-1][bounds[1:] > bounds[:-1]]
        seg_of = np.cumsum(bounds[1:] > bounds[:-1]) - 1  # request j -> its segment (when it has rows)
        mean_cols = [col["unique_blocks"], col["touched_block_ratio"], col["offset_p50"]]
        sum_cols = [all_columns.index(f"kv_fetch.{tier}.bytes_read") for tier in tiers]
        if seg_start.size:
            seg_sums = np.add.reduceat(matrix[:, mean_cols + sum_cols], seg_start, axis=0)
            seg_n = np.diff(np.append(seg_start, R))
            seg_means = (seg_sums[:, :3] / seg_n[:, None]).tolist()
            seg_bytes = seg_sums[:, 3:].tolist()
            seg_max_ub = np.maximum.reduceat(matrix[:, col["unique_blocks"]], seg_start).astype(np.int64).tolist()
        tier_keys = [f"{sc.KV_BYTES_PREFIX}{tier}.bytes_read" for tier in tiers]
        for j, st in enumerate(req_list):
            if st is None:
                continue
            a, b = int(bounds[j]), int(bounds[j + 1])
            if a == b:
                continue
            if cap.phase == "decode":
                self._close_prefill(st, cap.t_start_ns)
                st.steps += 1
            if st.hot_prefix is not None:  # touched blocks inside the cached prefix
                blocks = st_all.block_ids[blk_off[a]:blk_off[b]]
                hit = blocks[blocks < st.prefix_blocks]
                st.hot_prefix += np.bincount(hit, minlength=st.prefix_blocks)[: st.prefix_blocks]
            kw: dict[str, Any] = {}
            if flat_pos is not None:
                kw["positions"] = (flat_pos[pos_off[a]:pos_off[b]], st_all.valid_lengths[a:b])
                if flat_scores is not None:
                    kw["scores_f16"] = flat_scores[pos_off[a]:pos_off[b]]
            if cfg.wants_blocks:
                kw["block_ids"] = (st_all.block_ids[blk_off[a]:blk_off[b]], unique_blocks[a:b])
                if phys is not None:
                    kw["physical_block_ids"] = (phys[blk_off[a]:blk_off[b]], unique_blocks[a:b])
            if hist is not None:
                h0, h1 = hist_cut[j], hist_cut[j + 1]
                kw["offset_hist"] = (OFFSET_HIST_MBITS, hist_buckets[h0:h1], hist_counts[h0:h1])
            slab = matrix[a:b]
            payload = StepPayload(
                layer_ids=row_layer[a:b], columns=all_columns, stats=slab,
                positions=Ragged(*kw["positions"]) if "positions" in kw else None,
                block_ids=Ragged(*kw["block_ids"]) if "block_ids" in kw else None,
                physical_block_ids=Ragged(*kw["physical_block_ids"]) if "physical_block_ids" in kw else None,
                scores=kw.get("scores_f16"), offset_hist_mbits=OFFSET_HIST_MBITS,
                offset_hist_buckets=kw["offset_hist"][1], offset_hist_counts=kw["offset_hist"][2])
            seq_len = int(seq_rows[a])
            step_idx = int(step_rows[a]) if step_rows is not None else seq_len - 1
            seg = int(seg_of[j])
            means = seg_means[seg]
            attrs: dict[str, Any] = {
                sc.REQUEST_ID: st.request_id, sc.STEP_IDX: step_idx, sc.SEQ_LEN: seq_len,
                sc.N_LAYERS: b - a, sc.RANK: cfg.rank, sc.DETAIL: cfg.detail,
                sc.BATCH_SIZE: cap.step_requests or len(req_list),
                sc.MEAN_UNIQUE_BLOCKS: means[0], sc.MAX_UNIQUE_BLOCKS: seg_max_ub[seg],
                sc.MEAN_TOUCHED_RATIO: means[1], sc.MEAN_OFFSET_P50: means[2],
                sc.PHASE: cap.phase,
                **self._prefix_attrs(st),
            }
            for key, value in zip(tier_keys, seg_bytes[seg]):
                attrs[key] = value
            if st.key is not None:
                attrs[sc.REQUEST_KEY] = st.key
            if self.embed_payload:  # only serialised when an exporter other than the in-process JSONL reads it
                text = base64.b64encode(encode_step_payload(row_layer[a:b], all_columns, slab, **kw)).decode("ascii")
                attrs.update(payload_attributes(text, cfg.payload_chunk_bytes))
            self._emit_step_span(sc.SPAN_DECODE_STEP if cap.phase == "decode" else "dsa.prefill_chunk", st,
                                 attrs, payload, cap.t_start_ns, cap.t_end_ns)
            self.counters.rows_traced += b - a
        self.counters.steps_captured += 1

    def _emit_step_span(self, name: str, st: RequestState, attrs: dict[str, Any], payload: StepPayload,
                        start_ns: int, end_ns: int) -> None:
        """One finished step span, child of the request span, to the exporters (and its payload to the handoff).

        With the SDK's tracer the span is built finished, as a ``ReadableSpan`` handed to the tracer's span
        processor: the same object the SDK hands processors when a span ends, with the same trace id, flags,
        parent, resource and scope. Going through ``start_span``/``end`` instead costs ~10x more per span
        (sampler, attribute validation, locks, SDK metrics), a quarter of a worker's time at 32 requests per
        step, and buys nothing here: the sampling decision was taken for the request span (its children follow
        it, as under the SDK's ParentBased default) and these attribute values are built above with valid OTel
        types. Resource and instrumentation scope are the request span's. Any other tracer (a user's own, the
        no-op one) gets the ``start_span`` path."""
        parent = st.span_context
        proc = self._span_processor
        if proc is None:
            span = self.tracer.start_span(name, context=st.context, attributes=attrs, start_time=start_ns)
            self.handoff.put(span.get_span_context().span_id, payload)  # in-process: exporters skip re-parsing
            span.end(end_time=end_ns)
            return
        if not parent.trace_flags.sampled or not isinstance(st.span, ReadableSpan):  # sampled out by the SDK
            return
        ctx = SpanContext(parent.trace_id, self.id_gen.generate_span_id(), is_remote=False,
                          trace_flags=parent.trace_flags, trace_state=parent.trace_state)
        self.handoff.put(ctx.span_id, payload)
        proc.on_end(ReadableSpan(name, ctx, parent, st.span.resource, attrs, start_time=start_ns, end_time=end_ns,
                                 instrumentation_scope=st.span.instrumentation_scope))

    def _groups_to_host(self, cap: StepCapture) -> None:
        """Copy device-resident per-request vectors (seq_lens, block tables, steps) to the host on the side
        stream, after the snapshot's event, so this thread never waits on the model's stream."""
        if cap.packed is not None and len(cap.packed_layout) > 1:  # one copy of the region holding them all
            stream = self._stream(cap.indices.device)
            with torch.cuda.stream(stream):
                stream.wait_event(cap.event)
                flat = cap.packed[cap.indices.numel():].to("cpu", non_blocking=True)
                _wait(stream)
            host = flat.numpy().astype(np.int64)
            base = cap.indices.numel()
            for key, (off, shape) in cap.packed_layout.items():
                if key != "pos":
                    gi, name = key
                    setattr(cap.groups[gi], name, host[off - base: off - base + int(np.prod(shape))].reshape(shape))
            return
        dev_tensors = [(g, name) for g in cap.groups for name in ("seq_lens", "block_table", "steps")
                       if isinstance(getattr(g, name), torch.Tensor) and getattr(g, name).is_cuda]
        if not dev_tensors:
            return
        stream = self._stream(cap.indices.device)
        with torch.cuda.stream(stream):
            stream.wait_event(cap.event)
            host = [getattr(g, name).to("cpu", non_blocking=True) for g, name in dev_tensors]
            _wait(stream)
        for (g, name), h in zip(dev_tensors, host):
            setattr(g, name, h.numpy())

    @staticmethod
    def _per_row(groups: list, values: list, row_group: np.ndarray, row_bpos: np.ndarray) -> np.ndarray:
        """Broadcast per-group vectors (one value per batch position, or a scalar) to the step's rows."""
        flat = [np.broadcast_to(_host(v).reshape(-1) if v is not None else np.zeros(1, np.int64),
                                (len(g.request_ids),)) for g, v in zip(groups, values)]
        base = np.cumsum([0] + [f.size for f in flat])[:-1]
        return np.concatenate(flat).astype(np.int64)[base[row_group] + row_bpos]

    def _sorted_rows(self, cap: StepCapture, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows grouped by request and sorted, as host int32 (and scores float32).

        CUDA: sort and regroup on a side stream after the snapshot's event, copy to pinned memory, and wait here
        (only this thread waits). CPU: numpy's SIMD sort, which releases the GIL."""
        idx, scores = cap.indices, cap.scores
        if idx.is_cuda:
            stream = self._stream(idx.device)
            with torch.cuda.stream(stream):
                stream.wait_event(cap.event)
                order = torch.from_numpy(perm).pin_memory().to(idx.device, non_blocking=True)  # no pageable copy
                rows = idx.index_select(0, order)
                if scores is not None:
                    rows, o = torch.sort(rows, dim=1, stable=True)
                    sc_host = scores.index_select(0, order).gather(1, o).float().to("cpu", non_blocking=True)
                else:
                    rows = torch.sort(rows, 1).values
                    sc_host = None
                pos_host = rows.to(torch.int32).to("cpu", non_blocking=True)
                _wait(stream)
            return pos_host.numpy(), (sc_host.numpy() if sc_host is not None else None)
        src = idx.numpy()
        if src.dtype != np.int32:  # positions < 2**31 (the snapshot ring already stores int32)
            src = src.astype(np.int32)
        pos = np.take(src, perm, axis=0, out=self._workspace.get("pos", src.shape, np.int32))  # regroup by request
        if scores is None:
            pos.sort(axis=1)
            return pos, None
        order = np.argsort(pos, axis=1, kind="stable")
        return (np.take_along_axis(pos, order, 1),
                np.take_along_axis(scores.float().numpy()[perm], order, 1))

    def _apply_kv_reports(self, tiers: dict[str, dict[str, np.ndarray]], cap: StepCapture, row_layer: np.ndarray,
                          row_req: np.ndarray, req_index: dict, R: int) -> dict[str, dict[str, np.ndarray]]:
        """Explicit record_kv_fetch reports replace the model's numbers for the rows they cover."""
        if not cap.kv_reports:
            return tiers
        reported: dict[str, dict[str, np.ndarray]] = {}
        covered = np.zeros(R, dtype=bool)
        row_lookup = {(int(l), int(r)): i for i, (l, r) in enumerate(zip(row_layer, row_req))}
        for rep in cap.kv_reports:
            t = reported.setdefault(rep.tier, {f: np.zeros(R) for f in TIER_FIELDS})
            for b, rid in enumerate(rep.request_ids):
                j = req_index.get(rid)
                i = row_lookup.get((rep.layer_id, j)) if j is not None else None
                if i is None:
                    continue
                covered[i] = True
                for f in TIER_FIELDS:
                    t[f][i] = float(rep.values[f][b])
        if covered.all():
            return reported
        merged = {name: {f: np.where(covered, 0.0, v[f]) for f in TIER_FIELDS} for name, v in tiers.items()}
        for name, v in reported.items():
            base = merged.setdefault(name, {f: np.zeros(R) for f in TIER_FIELDS})
            for f in TIER_FIELDS:
                base[f] = np.where(covered, v[f], base[f])
        return merged


def side_stream(streams: dict, dev: torch.device) -> Any:
    """The background side stream of a device (created once per worker), so tracing's copies never queue behind
    or in front of the model's own kernels on its stream."""
    s = streams.get(dev)
    if s is None:
        s = streams[dev] = torch.cuda.Stream(device=dev)
    return s


def _wait(stream: Any) -> None:
    """Wait for a side stream's work on a blocking-sync event: only this background thread sleeps (the model's
    stream is not synchronised), and torch releases the GIL while it waits, so the model thread keeps launching.
    (Polling ``query()`` in a sleep loop instead costs a GIL hand-over every wake-up.)"""
    ev = torch.cuda.Event(blocking=True)
    ev.record(stream)
    ev.synchronize()


def _host(x: Any) -> np.ndarray:
    """A host numpy view of a snapshot value (device tensors are copied; tiny per-step vectors only)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def payload_attributes(text: str, chunk: int) -> dict[str, Any]:
    """The payload as one attribute, or split into numbered chunks under backends' attribute size limits."""
    if chunk <= 0 or len(text) <= chunk:
        return {sc.PAYLOAD: text}
    parts = [text[i:i + chunk] for i in range(0, len(text), chunk)]
    out: dict[str, Any] = {f"{sc.PAYLOAD}.{i}": part for i, part in enumerate(parts)}
    out[sc.PAYLOAD_CHUNKS] = len(parts)
    return out


def remote_parent_link(traceparent: str) -> SpanContext | None:
    """Parse a W3C ``traceparent`` header into a span context to link the request span to."""
    try:
        version, trace_id, span_id, flags = traceparent.strip().split("-")
        if len(trace_id) != 32 or len(span_id) != 16:
            return None
        return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                           trace_flags=TraceFlags(int(flags, 16) & 1))
    except (ValueError, AttributeError):
        return None


__all__ = ["Materializer", "Counters", "RequestState", "remote_parent_link", "NonRecordingSpan"]
