"""End-to-end: real TracerProvider -> materializer -> non-blocking processor -> sharded JSONL, checked against
statistics recomputed independently from the raw indices the workload produced."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dsa_otel import DSATracer, TraceConfig, request_id_from_trace_id, trace_id_for_request
from dsa_otel import semconv as sc
from dsa_otel.exporters import ShardedJsonlExporter, read_records
from reference import row_reference


def run_workload(cfg: TraceConfig, *, n_requests=6, batch=3, steps=4, layers=3, K=48, block_table=True,
                 prefix=None, scores=False, extra_exporters=(), string_ids=False, seed=0):
    """Drive the tracer like an engine with continuous batching; return what was fed in."""
    rng = np.random.default_rng(seed)
    prefix = prefix or {}
    cfg = cfg.replace(ring_slots=max(cfg.ring_slots, 256))  # these tests check completeness, not back-pressure
    jsonl = ShardedJsonlExporter(cfg)
    tracer = DSATracer(cfg, exporters=[jsonl, *extra_exporters])
    fed = []  # (rid, step_idx, layer, seq_len, raw row, table row, prefix blocks, score row)
    ids = [f"req-{i}" if string_ids else i for i in range(n_requests)]
    prompt = {rid: int(rng.integers(20, 200)) for rid in ids}
    tables = {rid: rng.permutation(1000)[:16] for rid in ids}
    for rid in ids:
        tracer.start_request(rid, prompt[rid])
        if rid in prefix:
            tracer.record_prefix(rid, cached_blocks=prefix[rid], physical_block_ids=tables[rid][: prefix[rid]].tolist())
    for start in range(0, n_requests, batch):
        group = ids[start:start + batch]
        for s in range(steps):
            seq = np.array([prompt[r] + s for r in group])
            bt = torch.from_numpy(np.stack([tables[r] for r in group]))
            for layer in range(layers):
                raw = np.stack([rng.choice(max(n, K), size=K, replace=False) for n in seq])
                raw[raw >= seq[:, None]] = -1  # padding when the context is shorter than K
                sc_t = torch.from_numpy(rng.standard_normal(raw.shape).astype(np.float32)) if scores else None
                tracer.record_topk(layer, torch.from_numpy(raw), torch.from_numpy(seq), group,
                                   scores=sc_t, block_table=bt if block_table else None)
                for b, rid in enumerate(group):
                    fed.append((rid, int(seq[b]) - 1, layer, int(seq[b]), raw[b],
                                tables[rid] if block_table else None, prefix.get(rid, 0),
                                None if sc_t is None else sc_t[b].numpy()))
            tracer.end_step()
        for rid in group:
            tracer.end_request(rid)
    tracer.shutdown()
    return tracer, fed, ids


@pytest.mark.parametrize("detail", ["summary", "blocks", "full"])
def test_jsonl_equals_independent_statistics(out_dir, detail):
    cfg = TraceConfig(out_dir=out_dir, run_name="t", detail=detail, kv_block_size=16, max_requests_per_file=4,
                      store_scores=True)
    tracer, fed, ids = run_workload(cfg, prefix={1: 3, 4: 2}, scores=True)
    recs = list(read_records(os.path.join(out_dir, "t")))
    assert len(recs) == len(fed)
    by_key = {(r["request_id"], r["step_idx"], r["layer_id"]): r for r in recs}
    assert len(by_key) == len(recs)
    for rid, step_idx, layer, seq_len, raw, table, pblocks, srow in fed:
        rec = by_key[(rid, step_idx, layer)]
        ref = row_reference(raw, seq_len, 16, pblocks, table, srow)
        for k in ("seq_len_current", "unique_token_pos_count", "offset_min", "offset_max", "unique_blocks",
                  "total_blocks_in_use"):
            assert rec[k] == ref[k], k
        assert rec["offset_p50"] == pytest.approx(ref["offset_p50"])
        assert rec["touched_block_ratio"] == pytest.approx(ref["touched_block_ratio"])
        for k in ("mean", "p50", "p95"):
            assert rec["tokens_per_touched_block"][k] == pytest.approx(ref["tokens_per_touched_block"][k])
        assert rec["prefix"]["intersection_blocks"] == ref["prefix"]["intersection_blocks"]
        assert rec["prefix"]["intersection_ratio"] == pytest.approx(ref["prefix"]["intersection_ratio"])
        assert rec["prefix"]["prefix_cached_blocks"] == pblocks
        assert rec["prefix"]["prefix_cache_hit"] == (pblocks > 0)
        hbm = rec["kv_fetch"]["hbm"]
        assert hbm["bytes_read"] == ref["unique_token_pos_count"] * cfg.kv_bytes_per_token
        assert hbm["hit_blocks"] == ref["unique_blocks"]
        assert hbm["read_ops"] == ref["physical_block_runs"]
        assert hbm["batch_size"] == 3
        assert rec["scores_stats"]["max"] == pytest.approx(ref["scores_stats"]["max"], rel=1e-6)
        assert rec["scores_stats"]["mean"] == pytest.approx(ref["scores_stats"]["mean"], rel=1e-5, abs=1e-6)
        if detail == "summary":
            assert "selected_block_ids" not in rec and "selected_token_pos" not in rec
        else:
            assert rec["selected_block_ids"] == ref["selected_block_ids"]
            assert rec["physical_block_ids"] == ref["physical_block_ids"]
        if detail == "full":
            assert rec["selected_token_pos"] == ref["selected_token_pos"]
            assert len(rec["scores_topk"]) == len(rec["selected_token_pos"])
        else:
            assert "selected_token_pos" not in rec and "scores_topk" not in rec
        assert rec["trace_id"] == f"{trace_id_for_request('t', rid):032x}"


def test_shards_and_run_files(out_dir):
    cfg = TraceConfig(out_dir=out_dir, run_name="shards", max_requests_per_file=4, kv_block_size=16)
    _, fed, ids = run_workload(cfg, n_requests=10, batch=3)
    run_dir = os.path.join(out_dir, "shards", "block16")
    files = sorted(f for f in os.listdir(run_dir) if f.startswith("trace_steps_"))
    assert files == ["trace_steps_0_3.jsonl", "trace_steps_4_7.jsonl", "trace_steps_8_11.jsonl"]
    seen: dict[int, str] = {}
    for f in files:
        a, b = map(int, re.match(r"trace_steps_(\d+)_(\d+)\.jsonl", f).groups())
        for rec in read_records(os.path.join(run_dir, f)):
            rid = rec["request_id"]
            assert a <= rid <= b and rid // 4 == a // 4
            assert seen.setdefault(rid, f) == f  # a request never spans two shards
    assert sorted(seen) == ids
    meta = json.load(open(os.path.join(run_dir, "run_meta.json")))
    assert meta["block_size_tokens"] == 16 and meta["run_name"] == "shards" and meta["rank"] == 0
    assert meta["world_size"] == 1 and "created_at_ms" in meta and meta["config"]["detail"] == "blocks"
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["records"] == len(fed)
    ub = np.array([row_reference(raw, seq, 16)["unique_blocks"] for _, _, _, seq, raw, *_ in fed])
    d = summary["unique_blocks"]
    assert d["count"] == ub.size and d["min"] == ub.min() and d["max"] == ub.max()
    assert d["mean"] == pytest.approx(ub.mean())
    assert d["p50"] == pytest.approx(np.percentile(ub, 50), rel=0.01, abs=1)
    assert summary["tracing"]["steps_dropped"] == 0 and summary["tracing"]["spans_dropped"] == 0
    assert not [f for f in os.listdir(run_dir) if f.endswith(".partial")]


def test_summary_offsets_and_hot_prefix_blocks(out_dir):
    cfg = TraceConfig(out_dir=out_dir, run_name="sum", kv_block_size=16)
    _, fed, _ = run_workload(cfg, prefix={0: 4, 2: 1}, n_requests=3, batch=3)
    summary = json.load(open(os.path.join(out_dir, "sum", "block16", "summary.json")))
    offsets = np.concatenate([row_reference(raw, seq, 16)["offsets"] for _, _, _, seq, raw, *_ in fed])
    o = summary["offsets"]
    assert o["count"] == offsets.size
    assert o["min"] == offsets.min() and o["max"] == offsets.max()
    assert o["p50"] == pytest.approx(np.percentile(offsets, 50), rel=0.07, abs=1)
    assert o["p95"] == pytest.approx(np.percentile(offsets, 95), rel=0.07, abs=1)
    # hot prefix blocks of request 0: touches of its 4 cached blocks, most touched first
    touches = np.zeros(4, dtype=int)
    for rid, _, _, seq, raw, *_ in fed:
        if rid == 0:
            for b in row_reference(raw, seq, 16)["selected_block_ids"]:
                if b < 4:
                    touches[b] += 1
    hot = summary["hot_prefix_blocks"]["0"]
    assert {b: c for b, c in hot} == {b: int(c) for b, c in enumerate(touches) if c > 0}
    assert [c for _, c in hot] == sorted((c for _, c in hot), reverse=True)
    assert summary["requests_with_prefix_hit"] == 2


def test_one_trace_per_request_with_deterministic_ids(out_dir):
    mem = InMemorySpanExporter()
    cfg = TraceConfig(out_dir=out_dir, run_name="ids", kv_block_size=16)
    _, fed, ids = run_workload(cfg, extra_exporters=[mem], prefix={2: 1})
    spans = mem.get_finished_spans()
    roots = [s for s in spans if s.name == sc.SPAN_REQUEST]
    assert len(roots) == len(ids)
    for root in roots:
        rid = root.attributes[sc.REQUEST_ID]
        assert root.parent is None
        assert root.context.trace_id == trace_id_for_request("ids", rid)
        assert request_id_from_trace_id(root.context.trace_id) == rid
        children = [s for s in spans if s.context.trace_id == root.context.trace_id and s is not root]
        assert all(c.parent.span_id == root.context.span_id for c in children)
        # step spans are built finished (materializer._emit_step_span): they must match what the SDK makes
        for c in children:
            assert c.context.trace_flags == root.context.trace_flags and c.context.trace_flags.sampled
            assert c.instrumentation_scope == root.instrumentation_scope and c.resource is root.resource
            assert c.kind == root.kind and c.status.status_code == root.status.status_code
            assert c.start_time <= c.end_time and c.context.span_id != root.context.span_id
        assert len({c.context.span_id for c in children}) == len(children)
        names = sorted(c.name for c in children)
        assert names.count(sc.SPAN_DECODE_STEP) == 4 and names.count(sc.SPAN_PREFILL) == 1
        assert root.attributes[sc.STEPS_TRACED] == 4
        assert root.start_time <= min(c.start_time for c in children)
        assert root.end_time >= max(c.end_time for c in children)
    step = next(s for s in spans if s.name == sc.SPAN_DECODE_STEP)
    assert len(step.attributes[sc.PAYLOAD]) > 0 and step.attributes[sc.N_LAYERS] == 3
    assert step.resource.attributes[sc.RES_RUN_NAME] == "ids"


def test_an_sdk_sampler_that_drops_requests_drops_their_step_spans_too(out_dir, monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    mem = InMemorySpanExporter()
    cfg = TraceConfig(out_dir=out_dir, run_name="off", kv_block_size=16)
    run_workload(cfg, extra_exporters=[mem])
    assert mem.get_finished_spans() == ()
    assert list(read_records(os.path.join(out_dir, "off"))) == []


def test_string_request_ids_get_stable_int_ids_and_keys(out_dir):
    mem = InMemorySpanExporter()
    cfg = TraceConfig(out_dir=out_dir, run_name="str", kv_block_size=16)
    _, fed, ids = run_workload(cfg, extra_exporters=[mem], string_ids=True, n_requests=4, batch=2)
    recs = list(read_records(os.path.join(out_dir, "str")))
    assert sorted({r["request_id"] for r in recs}) == [0, 1, 2, 3]
    roots = {s.attributes[sc.REQUEST_KEY]: s for s in mem.get_finished_spans() if s.name == sc.SPAN_REQUEST}
    assert set(roots) == set(ids)
    for key, root in roots.items():
        assert root.context.trace_id == trace_id_for_request("str", key)
        assert root.attributes[sc.REQUEST_ID] == ids.index(key)  # first-seen order


def test_sampling_keeps_or_drops_whole_requests(out_dir):
    mem = InMemorySpanExporter()
    cfg = TraceConfig(out_dir=out_dir, run_name="smp", kv_block_size=16, sample_rate=0.5, seed=3)
    tracer, fed, ids = run_workload(cfg, extra_exporters=[mem], n_requests=12, batch=4)
    sampled = {rid for rid in ids if tracer.is_sampled(rid)}
    assert 0 < len(sampled) < len(ids)
    recs = list(read_records(os.path.join(out_dir, "smp")))
    assert {r["request_id"] for r in recs} == sampled
    per_req = {rid: sum(1 for r in recs if r["request_id"] == rid) for rid in sampled}
    assert set(per_req.values()) == {4 * 3}  # every step and layer of a sampled request
    traces = {s.context.trace_id for s in mem.get_finished_spans()}
    assert traces == {trace_id_for_request("smp", rid) for rid in sampled}
    assert tracer.counters.requests_sampled_out == len(ids) - len(sampled)


def test_disabled_tracer_is_a_noop(out_dir):
    cfg = TraceConfig(out_dir=out_dir, enabled=False)
    tracer = DSATracer(cfg)
    tracer.start_request(0, 10)
    tracer.record_topk(0, torch.zeros(1, 4, dtype=torch.long), torch.tensor([10]), [0])
    assert tracer.end_step() is False
    tracer.end_request(0)
    tracer.shutdown()
    assert not os.path.exists(out_dir)


def test_explicit_kv_fetch_reports_replace_the_model(out_dir):
    cfg = TraceConfig(out_dir=out_dir, run_name="kv", kv_block_size=16)
    tracer = DSATracer(cfg)
    rids = [0, 1]
    seq = torch.tensor([100, 120])
    for layer in range(2):
        tracer.record_topk(layer, torch.arange(32).repeat(2, 1), seq, rids)
        tracer.record_kv_fetch(layer, rids, "host_dram", bytes_read=[1000 * (layer + 1), 2000], read_ops=[2, 3],
                               hit_blocks=[1, 2], latency_us=[5.5, 6.5])
    tracer.end_step()
    for r in rids:
        tracer.end_request(r)
    tracer.shutdown()
    recs = {(r["request_id"], r["layer_id"]): r for r in read_records(os.path.join(out_dir, "kv"))}
    assert recs[(0, 1)]["kv_fetch"] == {"host_dram": {"bytes_read": 2000, "read_ops": 2, "hit_blocks": 1,
                                                      "latency_us": 5.5, "batch_size": 2}}
    assert recs[(1, 0)]["kv_fetch"]["host_dram"]["latency_us"] == 6.5


def test_metrics_expose_drops(out_dir):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    cfg = TraceConfig(out_dir=out_dir, run_name="m", ring_slots=1, kv_block_size=16)
    tracer = DSATracer(cfg, meter_provider=MeterProvider(metric_readers=[reader]))
    tracer.materializer.queue.put(("flush", _Blocker()))  # hold the materializer so the ring fills up
    results = []
    for step in range(5):
        tracer.record_topk(0, torch.arange(16).unsqueeze(0), torch.tensor([64]), [0])
        results.append(tracer.end_step())
    _Blocker.release.set()
    tracer.shutdown()
    assert results[0] is True and results.count(False) >= 3
    data = reader.get_metrics_data()
    values = {m.name: m.data.data_points[0].value for rm in data.resource_metrics for s in rm.scope_metrics
              for m in s.metrics}
    assert values["dsa_otel.steps.dropped"] == results.count(False)
    summary = json.load(open(os.path.join(cfg.run_dir, "summary.json")))
    assert summary["tracing"]["steps_dropped"] == results.count(False)


class _Blocker:
    import threading

    release = threading.Event()

    def set(self):  # called by the materializer as a "flush" marker: block until released
        self.release.wait(10)


def test_record_topk_refuses_what_it_cannot_trace(out_dir):
    """Float positions and scores of another shape are caller bugs: a clear error at the call, nothing recorded."""
    tracer = DSATracer(TraceConfig(out_dir=out_dir, run_name="bad", kv_block_size=16))
    with pytest.raises(TypeError, match="integer positions"):
        tracer.record_topk(0, torch.zeros(2, 8), torch.tensor([10, 10]), [0, 1])
    with pytest.raises(ValueError, match="do not match"):
        tracer.record_topk(0, torch.zeros(2, 8, dtype=torch.long), torch.tensor([10, 10]), [0, 1],
                           scores=torch.zeros(2, 7))
    assert tracer.end_step() is False  # nothing was recorded
    tracer.shutdown()
