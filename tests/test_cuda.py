"""CUDA path: identical records to the CPU path, and no host synchronisation on the model thread.

Runs only where a GPU is present (the device machine; see bench/results/ for the recorded runs). CI has no GPU,
so these are not part of CI's coverage."""


import numpy as np
import pytest
import torch

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.exporters import read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(out_dir, device, detail, sync_check=False, worker="thread"):
    n = int(worker[len("process"):] or 1) if worker.startswith("process") else 1  # processN: N worker processes
    cfg = TraceConfig(out_dir=out_dir, run_name=f"r-{device}-{worker}", detail=detail, store_scores=True,
                      ring_slots=64, kv_block_size=16, max_requests_per_file=1 if n > 1 else 4,
                      worker="process" if n > 1 else worker, worker_processes=n)
    tracer = DSATracer(cfg)
    rng = np.random.default_rng(0)
    rids = [0, 1, 2]
    table = torch.from_numpy(rng.permutation(500)[:3 * 40].reshape(3, 40)).to(device)
    tracer.record_prefix(1, cached_blocks=2)
    for step in range(5):
        seq = torch.tensor([300 + step, 500 + step, 40], device=device)
        for layer in range(4):
            idx = torch.from_numpy(np.stack([rng.choice(600, 64, replace=False) for _ in range(3)])).to(device)
            idx[2, 50:] = -1
            scores = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32)).to(device)
            if sync_check:
                torch.cuda.set_sync_debug_mode("error")
            tracer.record_topk(layer, idx, seq, rids, scores=scores, block_table=table)
            if layer == 3:
                tracer.end_step()
            if sync_check:
                torch.cuda.set_sync_debug_mode("default")
    for r in rids:
        tracer.end_request(r)
    tracer.shutdown()
    return tracer, [{k: v for k, v in r.items() if k != "trace_id"} for r in read_records(cfg.run_dir)]


@pytest.mark.parametrize("worker", ["thread", "process", "process3"])
@pytest.mark.parametrize("detail", ["summary", "blocks", "full"])
def test_cuda_records_equal_cpu_records(tmp_path, detail, worker):
    _, cpu = _run(str(tmp_path), "cpu", detail)
    tr, gpu = _run(str(tmp_path), "cuda", detail, worker=worker)
    stats = tr.tracing_stats()
    assert stats["steps_failed"] == 0 and stats["steps_captured"] == 5
    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(cpu, key=key) == sorted(gpu, key=key)


def test_unpinnable_slots_fall_back_to_staged_copies(tmp_path, monkeypatch):
    """Where the driver will not page-lock a shared-memory slot, the step goes through a pinned staging buffer and a
    background copy (the model thread still never waits): the records are the CPU path's."""
    import dsa_otel.worker as W

    monkeypatch.setattr(W, "_host_register", lambda arr: False)
    _, cpu = _run(str(tmp_path), "cpu", "full")
    tr, gpu = _run(str(tmp_path), "cuda", "full", sync_check=True, worker="process")
    stats = tr.tracing_stats()
    assert stats["steps_failed"] == 0 and stats["steps_captured"] == 5
    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(cpu, key=key) == sorted(gpu, key=key)


def test_process_worker_recycles_slots_on_cuda(tmp_path):
    """Two slots, twelve steps of all layers at once ([L, B, K], as a CUDA graph hands them over): each slot comes
    back through its done word and its snapshot buffer is reused, no step is lost, and the model thread never
    synchronises while it records, ends steps and collects slots."""
    import time

    cfg = TraceConfig(out_dir=str(tmp_path), run_name="recycle", detail="blocks", ring_slots=2, kv_block_size=16,
                      worker="process")
    tracer = DSATracer(cfg)
    assert tracer.flush(timeout_s=60)
    table = torch.arange(3 * 40, device="cuda").view(3, 40)
    rids = [0, 1, 2]
    for step in range(12):
        seq = torch.tensor([300 + step, 500 + step, 40], device="cuda")
        idx = torch.randint(0, 40, (4, 3, 64), device="cuda", dtype=torch.int32)
        torch.cuda.set_sync_debug_mode("error")
        tracer.record_topk(range(4), idx, seq, rids, block_table=table)
        assert tracer.end_step()
        torch.cuda.set_sync_debug_mode("default")
        deadline = time.monotonic() + 30
        while len(tracer.materializer._in_flight) == cfg.ring_slots and time.monotonic() < deadline:
            time.sleep(0.01)
            tracer.materializer.poll()
    for r in rids:
        tracer.end_request(r)
    tracer.shutdown(timeout_s=60)
    stats = tracer.tracing_stats()
    assert stats["steps_captured"] == 12 and stats["steps_failed"] == 0 and stats["steps_dropped"] == 0
    recs = list(read_records(cfg.run_dir))
    assert len(recs) == 12 * 4 * 3
    for r in recs:  # lengths and block tables came through the packed snapshot: row b of the table is 40 * b + i
        b = r["request_id"]
        assert r["physical_block_ids"] == [40 * b + x for x in r["selected_block_ids"]]
        assert r["seq_len_current"] in ([300 + s for s in range(12)], [500 + s for s in range(12)], [40])[b]


def test_steps_waiting_for_a_worker_hold_host_slots_not_device_memory(tmp_path):
    """With the worker stopped, ten steps wait in ten shared-memory slots while the model goes on: the device
    snapshot buffer is handed back as soon as its copy is enqueued (the next snapshot waits for that copy on the
    GPU), so one or two device buffers serve them all; the records are still exactly the CPU path's."""
    import os
    import signal
    import time

    def run(device: str, worker: str):
        cfg = TraceConfig(out_dir=str(tmp_path), run_name=f"held-{device}", detail="blocks", ring_slots=16,
                          kv_block_size=16, worker=worker)
        tracer = DSATracer(cfg)
        assert tracer.flush(timeout_s=60)
        gen = torch.Generator().manual_seed(3)
        table = torch.arange(3 * 40).view(3, 40).to(device)
        pid = tracer.tracing_stats().get("worker_pid") if worker == "process" else None
        if pid:
            os.kill(pid, signal.SIGSTOP)
        try:
            for step in range(10):
                idx = torch.randint(0, 600, (4, 3, 64), generator=gen, dtype=torch.int32).to(device)
                tracer.record_topk(range(4), idx, torch.tensor([600 + step] * 3).to(device), [0, 1, 2],
                                   block_table=table)
                assert tracer.end_step()
            if pid:
                time.sleep(0.5)
                tracer.materializer.poll()
                assert len(tracer.materializer._in_flight) == 10  # all waiting for the worker
                held = sum(len(v) for v in tracer._ring._free.values())
                assert 1 <= held <= 2  # ...and the snapshot buffers are free for reuse
        finally:
            if pid:
                os.kill(pid, signal.SIGCONT)
        for r in (0, 1, 2):
            tracer.end_request(r)
        tracer.shutdown(timeout_s=60)
        assert tracer.tracing_stats()["steps_captured"] == 10
        return [{k: v for k, v in r.items() if k != "trace_id"} for r in read_records(cfg.run_dir)]

    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(run("cpu", "thread"), key=key) == sorted(run("cuda", "process"), key=key)


@pytest.mark.parametrize("worker", ["thread", "process", "process3"])
def test_model_thread_never_synchronises(tmp_path, worker):
    tr, recs = _run(str(tmp_path), "cuda", "full", sync_check=True, worker=worker)
    stats = tr.tracing_stats()
    assert stats["steps_failed"] == 0 and stats["steps_captured"] == 5
    assert len(recs) == 5 * 4 * 3


def test_indexer_bf16_scores_on_cuda_equal_float32():
    """On CUDA the indexer multiplies bf16 q and k on the tensor cores with a float32 result: equal to the float32
    computation on the same (bf16-representable) values up to summation order."""
    from dsa_otel.model.config import preset
    from dsa_otel.model.dsa import Indexer

    ix = Indexer(preset("tiny")).cuda()
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 1, ix.n_heads, ix.head_dim, generator=g).bfloat16()
    w = torch.randn(3, 1, ix.n_heads, generator=g)
    k = torch.randn(3, 300, ix.head_dim, generator=g).bfloat16()
    ref = ix.scores(q.float(), w, k.float())
    got = ix.scores(q.cuda(), w.cuda(), k.cuda()).cpu()
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_sparse_equals_dense_then_mask_on_cuda_bf16():
    """The small model's decode on the GPU in bf16: truly sparse attention equals dense-then-mask."""
    from dsa_otel.model.config import preset
    from dsa_otel.model.dsa import build_model
    from dsa_otel.model.kv import PagedKVCache

    args = preset("tiny", index_topk=12)
    torch.manual_seed(0)
    model = build_model(args, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, args.vocab_size, (2, 40), device="cuda")
    outs = {}
    for attn in ("sparse", "dense"):
        cache = PagedKVCache(args, 16, device="cuda", dtype=torch.bfloat16)
        for s in (0, 1):
            cache.add_sequence(s)
            cache.reserve(s, 41)
        table = cache.block_table([0, 1])
        model(tokens, torch.zeros(2, dtype=torch.long, device="cuda"), cache, table, attn=attn)
        outs[attn] = model(tokens[:, :1], torch.full((2,), 40, device="cuda"), cache, table, attn=attn)
    assert torch.allclose(outs["sparse"], outs["dense"], atol=3e-2, rtol=3e-2)


def _decode_run(out_dir, graphed: bool):
    """4 decode steps of a 2-sequence batch (unequal lengths) of the tiny model on the GPU, traced at `full`."""
    from dsa_otel.model.config import preset
    from dsa_otel.model.dsa import build_model
    from dsa_otel.model.graphs import DecodeGraph
    from dsa_otel.model.kv import PagedKVCache

    args = preset("tiny", index_topk=12)
    torch.manual_seed(0)
    model = build_model(args, device="cuda", dtype=torch.float32)
    cache = PagedKVCache(args, 32, device="cuda")
    g = torch.Generator().manual_seed(3)
    for s, n in ((0, 37), (1, 20)):
        cache.add_sequence(s)
        cache.reserve(s, n + 8)
        model(torch.randint(0, args.vocab_size, (1, n), generator=g).cuda(), torch.tensor([0], device="cuda"),
              cache, cache.block_table([s]))
        cache.advance(s, n)
    cfg = TraceConfig(out_dir=out_dir, run_name="graph" if graphed else "eager", detail="full",
                      kv_block_size=args.kv_block_size, ring_slots=64)
    tracer = DSATracer(cfg)
    table = cache.block_table([0, 1])
    graph = DecodeGraph(model, cache, 2, table.shape[1]) if graphed else None
    tok = torch.zeros(2, 1, dtype=torch.long, device="cuda")
    logits = []
    for _ in range(4):
        start = torch.tensor([cache.lengths[0], cache.lengths[1]], device="cuda")
        if graph is None:
            out = model(tok, start, cache, table, tracer=tracer, request_ids=[0, 1], last_only=True)
        else:
            out = graph(tok, start, table, tracer=tracer, request_ids=[0, 1])
        tracer.end_step()
        logits.append(out.clone())
        tok = out[:, -1].argmax(-1, keepdim=True)
        for s in (0, 1):
            cache.advance(s, 1)
    for r in (0, 1):
        tracer.end_request(r)
    tracer.shutdown()
    return torch.stack(logits), [{k: v for k, v in r.items() if k != "trace_id"} for r in read_records(cfg.run_dir)]


def test_cuda_graph_decode_equals_eager_decode_and_traces_the_same(tmp_path):
    """A DecodeGraph (captured once, replayed for 4 steps of a growing context) gives eager decoding's logits, and
    tracing it writes the same A/B records."""
    eager_logits, eager_recs = _decode_run(str(tmp_path), graphed=False)
    graph_logits, graph_recs = _decode_run(str(tmp_path), graphed=True)
    assert torch.allclose(eager_logits, graph_logits, atol=1e-4, rtol=1e-4)
    assert len(graph_recs) == len(eager_recs) == 4 * 3 * 2
    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(eager_recs, key=key) == sorted(graph_recs, key=key)
    assert {r["seq_len_current"] for r in graph_recs if r["request_id"] == 1} == {21, 22, 23, 24}


def test_engine_decoding_from_cuda_graphs_equals_eager_decoding_and_traces_the_same(tmp_path):
    """The engine with ``cuda_graphs=True``: batches of 1-3 running requests (padded to 1, 2, 4) and growing block
    tables (widths padded to powers of two) replay a handful of captured graphs; outputs, the prefix cache's work
    and the A-D records equal eager decoding's (float32, tiny model)."""
    from dsa_otel.model.config import preset
    from dsa_otel.model.dsa import build_model
    from dsa_otel.model.engine import Engine, Request

    args = preset("tiny", index_topk=12)
    torch.manual_seed(0)
    model = build_model(args, device="cuda", dtype=torch.float32)
    rng = np.random.default_rng(5)
    system = rng.integers(0, 256, 2 * args.kv_block_size + 3).tolist()
    prompts = [system + rng.integers(0, 256, 5 + 9 * i).tolist() for i in range(5)]

    def serve(graphs: bool):
        cfg = TraceConfig(out_dir=str(tmp_path), run_name="graphs" if graphs else "eager", detail="full",
                          kv_block_size=args.kv_block_size, ring_slots=64)
        tracer = DSATracer(cfg)
        reqs = [Request(i, p, max_new_tokens=4 + 3 * i, arrival_s=0.0) for i, p in enumerate(prompts)]
        engine = Engine(model, 64, max_batch=3, tracer=tracer, device="cuda", cuda_graphs=graphs)
        done = engine.run(reqs)
        tracer.shutdown()
        recs = [{k: v for k, v in r.items() if k != "trace_id"} for r in read_records(cfg.run_dir)]
        return {r.request_id: r.output for r in done}, recs, engine

    eager_out, eager_recs, _ = serve(False)
    graph_out, graph_recs, engine = serve(True)
    assert graph_out == eager_out
    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(graph_recs, key=key) == sorted(eager_recs, key=key)
    assert len(graph_recs) == sum(len(o) - 1 for o in graph_out.values()) * args.n_layers
    assert any(r["prefix"]["prefix_cache_hit"] for r in graph_recs)
    batches = {b for b, _ in engine.graphs}
    assert 4 in batches and len(engine.graphs) <= 8  # 3 requests padded to 4; a few graphs serve the run
