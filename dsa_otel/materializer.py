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
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

from . import semconv as sc
from .capture import StepCapture
from .config import TraceConfig
from .ids import RequestTraceIdGenerator, request_low_bits, run_trace_prefix
from .kvfetch import TIER_FIELDS, FetchBatch, HBMOnlyFetchModel, KVFetchModel
from .stats import OFFSET_HIST_MBITS, PAD_BLOCK, offset_bucket_bounds, stat_columns, step_statistics
from .wire import Ragged, encode_step_payload

log = structlog.get_logger("dsa_otel.materializer")

HOT_PREFIX_TOP = 20


@dataclass
class RequestState:
    request_id: int
    key: str | None
    span: Any
    context: Context
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
                 is_sampled: Callable[[int | str], bool], release_slot: Callable[[], None]) -> None:
        self.config = config
        self.tracer = tracer
        self.id_gen = id_gen
        self.kv_model: KVFetchModel = kv_fetch_model or HBMOnlyFetchModel(
            config.kv_bytes_per_token, config.hbm_bandwidth_gbps, config.hbm_op_latency_us)
        self.counters = counters
        self.is_sampled = is_sampled
        self.release_slot = release_slot
        self.requests: dict[int | str, RequestState] = {}
        self.unsampled: set[int | str] = set()
        self.next_int_id = 0
        self.string_ids: dict[str, int] = {}
        self._bucket_ids, bounds = offset_bucket_bounds(OFFSET_HIST_MBITS)
        self._bounds_cpu = torch.from_numpy(bounds)
        self._bounds_dev: dict[torch.device, torch.Tensor] = {}
        self._streams: dict[torch.device, Any] = {}
        self.trace_prefix = run_trace_prefix(config.run_name)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="dsa-otel-materializer", daemon=True)
        self.thread.start()

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
                    self.release_slot()

    # ------------------------------------------------------------------ requests
    def _int_id(self, rid: int | str) -> int:
        if isinstance(rid, (int, np.integer)) and not isinstance(rid, bool):
            return int(rid)
        got = self.string_ids.get(rid)  # type: ignore[arg-type]
        if got is None:
            while self.next_int_id in self.requests:
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
        st = RequestState(request_id=int_id, key=key, span=span,
                          context=otel_trace.set_span_in_context(span), t_start_ns=t_ns, prompt_len=int(prompt_len))
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
        s = self._streams.get(dev)
        if s is None:
            s = self._streams[dev] = torch.cuda.Stream(device=dev)
        return s

    def _on_step(self, cap: StepCapture) -> None:
        cfg = self.config
        groups = cap.groups
        # requests of the step, in first-seen order; rows map to them
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
        n_rec = cap.layer_ids.size
        row_record = np.repeat(np.arange(n_rec), cap.batch_sizes)
        row_bpos = np.concatenate([np.arange(n) for n in cap.batch_sizes]) if n_rec else np.zeros(0, np.int64)
        row_group = cap.record_group[row_record]
        row_req = np.concatenate([group_req[cap.record_group[i]][: cap.batch_sizes[i]] for i in range(n_rec)])
        row_layer = cap.layer_ids[row_record]
        R = row_req.size
        if R != cap.indices.shape[0]:
            raise ValueError(f"step has {cap.indices.shape[0]} selection rows but request lists cover {R}")

        # per-row host inputs
        seq_rows = np.concatenate([np.asarray(groups[cap.record_group[i]].seq_lens, dtype=np.int64).reshape(-1)
                                   [: cap.batch_sizes[i]] if not isinstance(groups[cap.record_group[i]].seq_lens,
                                                                            torch.Tensor) else
                                   np.zeros(cap.batch_sizes[i], np.int64) for i in range(n_rec)])
        seq_is_device = any(isinstance(g.seq_lens, torch.Tensor) for g in groups)
        prefix_req = np.array([st.prefix_blocks if st is not None else 0 for st in req_list], dtype=np.int64)
        prefix_rows = prefix_req[row_req]
        tables = [g.block_table for g in groups]
        has_table = all(t is not None for t in tables)
        need_blocks = cfg.wants_blocks or self.kv_model.needs_blocks or bool(prefix_req.any())

        dev = cap.indices.device
        stream = self._stream(dev) if cap.indices.is_cuda else None
        ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
        with ctx:
            if stream is not None and cap.event is not None:
                stream.wait_event(cap.event)
            if seq_is_device:
                seq_t = torch.cat([_as_tensor(groups[cap.record_group[i]].seq_lens, dev)[: cap.batch_sizes[i]]
                                   for i in range(n_rec)])
            else:
                seq_t = torch.from_numpy(seq_rows).to(dev, non_blocking=True)
            table_t, table_rows_t = None, None
            if has_table:
                width = max(t.shape[1] for t in tables)  # type: ignore[union-attr]
                padded = [torch.nn.functional.pad(t.to(dev), (0, width - t.shape[1]), value=-1)  # type: ignore
                          for t in tables]
                table_t = torch.cat(padded, 0)
                base = np.cumsum([0] + [t.shape[0] for t in tables])[:-1]  # type: ignore[union-attr]
                table_rows_t = torch.from_numpy(base[row_group] + row_bpos).to(dev, non_blocking=True)
            pos = cap.indices
            scores = cap.scores
            if scores is not None:
                pos, order = torch.sort(pos.long(), 1)
                scores = scores.gather(1, order)
            else:
                pos = torch.sort(pos.long(), 1).values
            bounds = self._bounds_dev.get(dev)
            if bounds is None:
                bounds = self._bounds_dev[dev] = self._bounds_cpu.to(dev)
            out = step_statistics(pos, seq_t, cfg.kv_block_size,
                                  prefix_blocks=torch.from_numpy(prefix_rows).to(dev, non_blocking=True),
                                  block_table=table_t, block_table_rows=table_rows_t,
                                  scores_sorted=scores, offset_bounds=bounds)
            row_req_t = torch.from_numpy(row_req).to(dev, non_blocking=True)
            hist_req = torch.zeros((len(req_list), out.offset_hist.shape[1]), dtype=torch.int64, device=dev)
            hist_req.index_add_(0, row_req_t, out.offset_hist.long())
            to_host = [out.stats, hist_req]
            if need_blocks:
                to_host.append(out.unique_blocks.to(torch.int32) if cfg.kv_block_size > 0 else out.unique_blocks)
                if out.physical_blocks is not None:
                    to_host.append(out.physical_blocks)
            if cfg.wants_positions:
                to_host.append(pos.to(torch.int32))
                if scores is not None and cfg.store_scores:
                    to_host.append(scores.to(torch.float16))
            host = [t.to("cpu", non_blocking=True) for t in to_host] if stream is not None else to_host
            if stream is not None:
                stream.synchronize()
        host_np = [t.numpy() for t in host]
        stats_np, hist_np = host_np[0], host_np[1]
        k = 2
        ublk_np = phys_np = pos_np = scores_np = None
        if need_blocks:
            ublk_np = host_np[k]
            k += 1
            if out.physical_blocks is not None:
                phys_np = host_np[k]
                k += 1
        if cfg.wants_positions:
            pos_np = host_np[k]
            k += 1
            if scores is not None and cfg.store_scores:
                scores_np = host_np[k]

        columns = stat_columns(out.physical_blocks is not None, cap.scores is not None)
        col = {c: i for i, c in enumerate(columns)}
        unique_blocks = stats_np[:, col["unique_blocks"]].astype(np.int64)
        blocks_ragged = None
        if ublk_np is not None:
            mask = ublk_np != PAD_BLOCK
            src = phys_np if (phys_np is not None) else ublk_np
            blocks_ragged = Ragged(values=src[mask].astype(np.int64), lengths=unique_blocks)
        fetch = FetchBatch(
            request_ids=[rid for rid in req_index], row_request=row_req, layer_ids=row_layer,
            tokens=stats_np[:, col["unique_token_pos_count"]].astype(np.int64), unique_blocks=unique_blocks,
            block_runs=stats_np[:, col["physical_block_runs" if "physical_block_runs" in col else "block_runs"]]
            .astype(np.int64), blocks=blocks_ragged, physical=phys_np is not None, block_size=cfg.kv_block_size)
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

        # hot prefix blocks per request (touched logical blocks inside the cached prefix)
        if ublk_np is not None and prefix_req.any():
            for j, st in enumerate(req_list):
                if st is None or st.hot_prefix is None:
                    continue
                rows = np.flatnonzero(row_req == j)
                sub = ublk_np[rows]
                hit = sub[(sub != PAD_BLOCK) & (sub < st.prefix_blocks)]
                st.hot_prefix += np.bincount(hit, minlength=st.prefix_blocks)[: st.prefix_blocks]

        step_rows = None
        if groups[0].steps is not None:
            step_rows = np.concatenate([np.broadcast_to(np.asarray(groups[cap.record_group[i]].steps,
                                                                   dtype=np.int64), (cap.batch_sizes[i],))
                                        if not isinstance(groups[cap.record_group[i]].steps, torch.Tensor)
                                        else groups[cap.record_group[i]].steps.cpu().numpy()[: cap.batch_sizes[i]]
                                        for i in range(n_rec)])
        seq_col = stats_np[:, col["seq_len_current"]].astype(np.int64)

        perm = np.argsort(row_req, kind="stable")
        bounds_r = np.searchsorted(row_req[perm], np.arange(len(req_list) + 1))
        valid_pos_mask = None
        if pos_np is not None:
            valid_pos_mask = (pos_np >= 0) & (pos_np < seq_col[:, None])
        for j, st in enumerate(req_list):
            if st is None:
                continue
            rows = perm[bounds_r[j]:bounds_r[j + 1]]
            if rows.size == 0:
                continue
            self._close_prefill(st, cap.t_start_ns)
            st.steps += 1
            payload_kwargs: dict[str, Any] = {}
            if pos_np is not None and valid_pos_mask is not None:
                m = valid_pos_mask[rows]
                payload_kwargs["positions"] = (pos_np[rows][m], m.sum(1))
                if scores_np is not None:
                    payload_kwargs["scores_f16"] = scores_np[rows][m]
            if cfg.wants_blocks and ublk_np is not None:
                sub = ublk_np[rows]
                m = sub != PAD_BLOCK
                lengths = m.sum(1)
                payload_kwargs["block_ids"] = (sub[m], lengths)
                if phys_np is not None:
                    payload_kwargs["physical_block_ids"] = (phys_np[rows][m], lengths)
            h = hist_np[j]
            nz = np.flatnonzero(h)
            payload_kwargs["offset_hist"] = (OFFSET_HIST_MBITS, self._bucket_ids[nz], h[nz])
            slab = matrix[rows]
            payload = encode_step_payload(row_layer[rows], all_columns, slab, **payload_kwargs)
            seq_len = int(seq_col[rows[0]])
            step_idx = int(step_rows[rows[0]]) if step_rows is not None else seq_len - 1
            a: dict[str, Any] = {
                sc.REQUEST_ID: st.request_id, sc.STEP_IDX: step_idx, sc.SEQ_LEN: seq_len,
                sc.N_LAYERS: int(rows.size), sc.RANK: cfg.rank, sc.DETAIL: cfg.detail,
                sc.BATCH_SIZE: len(req_list),
                sc.PAYLOAD: base64.b64encode(payload).decode("ascii"),
                sc.MEAN_UNIQUE_BLOCKS: float(slab[:, col["unique_blocks"]].mean()),
                sc.MAX_UNIQUE_BLOCKS: int(slab[:, col["unique_blocks"]].max()),
                sc.MEAN_TOUCHED_RATIO: float(slab[:, col["touched_block_ratio"]].mean()),
                sc.MEAN_OFFSET_P50: float(slab[:, col["offset_p50"]].mean()),
                sc.PHASE: cap.phase,
                **self._prefix_attrs(st),
            }
            for tier in tiers:
                a[f"{sc.KV_BYTES_PREFIX}{tier}.bytes_read"] = float(
                    slab[:, all_columns.index(f"kv_fetch.{tier}.bytes_read")].sum())
            if st.key is not None:
                a[sc.REQUEST_KEY] = st.key
            span = self.tracer.start_span(sc.SPAN_DECODE_STEP if cap.phase == "decode" else "dsa.prefill_chunk",
                                          context=st.context, attributes=a, start_time=cap.t_start_ns)
            span.end(end_time=cap.t_end_ns)
            self.counters.rows_traced += int(rows.size)
        self.counters.steps_captured += 1

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


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _as_tensor(x: Any, dev: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dev).long().reshape(-1)
    return torch.as_tensor(np.asarray(x, dtype=np.int64)).to(dev).reshape(-1)


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
