"""Serving engine: exact prefix cache with real reuse (D), tiered store accounting (C), reference-counted blocks,
continuous batching; and a traced shared-prefix run showing both in the JSONL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.exporters import read_records
from dsa_otel.kvfetch import FetchBatch
from dsa_otel.model.config import preset
from dsa_otel.model.dsa import build_model
from dsa_otel.model.engine import BlockPool, Engine, PrefixCache, Request
from dsa_otel.model.kv import OutOfBlocks, PagedKVCache
from dsa_otel.model.tiers import TieredKVStore, TierSpec
from dsa_otel.wire import Ragged

ARGS = preset("tiny", index_topk=12)
BS = ARGS.kv_block_size


@pytest.fixture(scope="module")
def model():
    return build_model(ARGS)


def shared_prefix_requests(n=4, prefix_blocks=3, new=6, seed=0):
    rng = np.random.default_rng(seed)
    system = rng.integers(0, 256, prefix_blocks * BS + 5).tolist()  # 3 full blocks + a partial one
    return [Request(i, system + rng.integers(0, 256, 10 + 3 * i).tolist(), max_new_tokens=new) for i in range(n)]


def test_prefix_reuse_gives_identical_outputs(model):
    with_cache = Engine(model, 256, prefix_caching=True).run(shared_prefix_requests())
    without = Engine(model, 256, prefix_caching=False).run(shared_prefix_requests())
    assert [r.output for r in with_cache] == [r.output for r in without]
    assert [r.prefix_blocks for r in sorted(with_cache, key=lambda r: r.request_id)] == [0, 3, 3, 3]


def test_continuous_batching_equals_running_alone(model):
    reqs = shared_prefix_requests(n=5, new=5)
    for i, r in enumerate(reqs):
        r.arrival_s = 0.01 * i  # staggered arrivals: requests join and leave between steps
        r.max_new_tokens = 3 + i
    batched = {r.request_id: r.output for r in Engine(model, 256, max_batch=2).run(reqs)}
    for r in shared_prefix_requests(n=5, new=5):
        r.max_new_tokens = 3 + r.request_id
        alone = Engine(model, 256, prefix_caching=False).run([r])[0]
        assert alone.output == batched[r.request_id]
        assert len(alone.output) == r.max_new_tokens


def test_cuda_graphs_need_a_cuda_device(model):
    with pytest.raises(ValueError, match="needs device='cuda'"):
        Engine(model, 64, cuda_graphs=True)


def test_arrivals_and_timings(model):
    reqs = shared_prefix_requests(n=3, new=3)
    for i, r in enumerate(reqs):
        r.arrival_s = 0.05 * i
    done = Engine(model, 256, max_batch=1).run(reqs)
    assert [r.request_id for r in done] == [0, 1, 2]
    for r in done:
        t = r.timings()
        assert r.t_admit >= r.arrival_s and t["queue_s"] >= 0 and 0 <= t["ttft_s"] <= t["e2e_s"]
        assert t["tpot_s"] >= 0 and r.finish_reason == "length"


def test_until_eos_or_context_limit(model):
    args = ARGS.replace(max_seq_len=64)
    m = build_model(args)
    r = Request(0, list(range(50)), max_new_tokens=0)  # <= 0: until EOS or the context limit
    done = Engine(m, 64).run([r])[0]
    assert done.finish_reason == "context" and len(done.prompt) + len(done.output) == 64


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "finish"]), st.integers(0, 3), st.integers(1, 70)),
                max_size=40))
def test_block_table_invariants(ops):
    pool = BlockPool(24)
    pc = PrefixCache(pool, BS)
    cache = PagedKVCache(ARGS, 24, allocator=pool)
    prefixes = [list(range(100 * k, 100 * k + 60)) for k in range(4)]
    live: dict[int, list[int]] = {}
    next_id = 0
    for op, k, extra in ops:
        if op == "admit":
            prompt = prefixes[k][:extra] + [7] * (extra % 5)
            blocks, _ = pc.match(prompt)
            cache.add_sequence(next_id, blocks)
            try:
                cache.reserve(next_id, len(prompt) - cache.lengths[next_id])
            except OutOfBlocks:
                cache.free(next_id)
                continue
            cache.advance(next_id, len(prompt) - cache.lengths[next_id])
            pc.register(prompt, cache.tables[next_id])
            live[next_id] = prompt
            next_id += 1
        elif live:
            rid = sorted(live)[k % len(live)]
            cache.free(rid)
            del live[rid]
        # invariants
        refs = [0] * 24
        for table in cache.tables.values():
            for b in table:
                refs[b] += 1
        assert refs == pool.ref
        free, evictable = set(pool.free), set(pool.evictable)
        assert not free & evictable
        for b in range(24):
            assert (pool.ref[b] > 0) == (b not in free and b not in evictable)
        assert set(pc.key_of) <= set(range(24)) and all(pc.by_key[k] == b for b, k in pc.key_of.items())
        for rid, prompt in live.items():  # a live request's cached prefix entries point at its own blocks
            for i, key in enumerate(pc.keys(prompt)):
                if key in pc.by_key and pc.by_key[key] == cache.tables[rid][i]:
                    assert pool.ref[cache.tables[rid][i]] >= 1


def test_eviction_respects_reference_counts():
    pool = BlockPool(6)
    pc = PrefixCache(pool, BS)
    a = list(range(3 * BS + 1))
    held = [pool.allocate() for _ in range(3)]
    pc.register(a, held)
    for b in held[:2]:
        pool.release(b)  # two cached blocks become evictable; the third stays referenced
    assert list(pool.evictable) == held[:2]
    others = [pool.allocate() for _ in range(4)]  # 3 free + 1 reclaimed (the least recently released)
    assert held[0] in others and held[2] not in others and pool.evictions == 1
    assert pc.match(a)[0] == []  # the chain is broken at block 0: nothing is reused from stale memory
    with pytest.raises(OutOfBlocks):
        pool.allocate(), pool.allocate()
    assert pool.ref[held[2]] == 1


def test_tier_accounting_by_hand():
    tiers = (TierSpec("hbm", 2, 1000.0, 1.0), TierSpec("dram", 2, 10.0, 5.0), TierSpec("remote", None, 1.0, 50.0))
    store = TieredKVStore(tiers, policy="lru", block_size=4, kv_bytes_per_token=10)
    block_bytes = 40

    def step(blocks, tokens):
        r = store.touch(0, np.array(blocks), tokens)
        store.step += 1
        return r

    s1 = step([0, 1], 5)  # first sight: written in HBM
    assert s1["hbm"]["hit_blocks"] == 2 and s1["hbm"]["read_ops"] == 1 and s1["hbm"]["bytes_read"] == 50
    step([2, 3], 5)       # HBM full: 0 then 1 go down to DRAM
    assert store.occupancy() == {"hbm": 2, "dram": 2, "remote": 0}
    step([4], 2)          # 2 -> DRAM, DRAM full -> 0 -> remote
    assert store.where[(0, 0)] == 2 and store.where[(0, 2)] == 1
    # HBM {3, 4}, DRAM {1, 2}, remote {0}. Touch 0: promoted from remote; HBM's LRU 3 drops to DRAM, whose LRU 1
    # drops to remote. Touch 1: so it is fetched from remote too. Both come from remote, in one contiguous run.
    s = step([0, 1], 3)
    assert s["remote"]["hit_blocks"] == 2 and s["dram"]["hit_blocks"] == 0 and s["hbm"]["hit_blocks"] == 0
    assert s["remote"]["bytes_read"] == 2 * block_bytes and s["remote"]["read_ops"] == 1
    assert s["remote"]["latency_us"] == pytest.approx(50.0 + 2 * block_bytes / 1e3)
    assert s["dram"]["latency_us"] == 0.0
    assert s["hbm"]["bytes_read"] == 30 and s["hbm"]["latency_us"] == pytest.approx(0.0 + 30 / 1e6)
    assert store.promotions == 2 and store.where[(0, 0)] == 0 and store.where[(0, 1)] == 0
    assert store.occupancy() == {"hbm": 2, "dram": 2, "remote": 1} and store.where[(0, 4)] == 1


def test_tier_policies_differ_and_account_through_the_fetch_protocol():
    tiers = (TierSpec("hbm", 3, 1000.0, 1.0), TierSpec("dram", None, 10.0, 5.0))
    seq = [[0, 1, 2], [0, 3], [0, 4], [1, 5], [0, 1]]
    results = {}
    for policy in ("lru", "lfu", "indexer"):
        store = TieredKVStore(tiers, policy=policy, block_size=4, kv_bytes_per_token=10, window=2)
        dram_hits = 0
        for blocks in seq:
            fb = FetchBatch(request_ids=[0], row_request=np.array([0]), layer_ids=np.array([0]),
                            tokens=np.array([4]), unique_blocks=np.array([len(blocks)]),
                            block_runs=np.array([1]), blocks=Ragged(np.array(blocks), np.array([len(blocks)])),
                            physical=True, block_size=4)
            out = store.account(fb)
            dram_hits += int(out["dram"]["hit_blocks"][0])
        results[policy] = dram_hits
    assert results["lfu"] <= results["lru"]  # block 0, touched most, is kept by LFU
    assert set(results) == {"lru", "lfu", "indexer"}


def test_traced_shared_prefix_run_shows_prefix_hits_and_tier_traffic(model, tmp_path):
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="eng", kv_block_size=BS, detail="blocks", ring_slots=64)
    store = TieredKVStore((TierSpec("hbm", 12, 3350.0, 1.0), TierSpec("dram", 24, 50.0, 5.0),
                           TierSpec("remote", None, 12.5, 50.0)), block_size=BS)
    tracer = DSATracer(cfg, kv_fetch_model=store)
    done = Engine(model, 256, tracer=tracer, max_batch=4).run(shared_prefix_requests(n=4, new=8))
    tracer.shutdown()
    recs = list(read_records(str(tmp_path / "eng")))
    assert len(recs) == sum(len(r.output) - 1 for r in done) * ARGS.n_layers
    hit = [r for r in recs if r["prefix"]["prefix_cache_hit"]]
    assert hit and {r["request_id"] for r in hit} == {1, 2, 3}
    assert all(r["prefix"]["prefix_cached_blocks"] == 3 for r in hit)
    assert any(r["prefix"]["intersection_blocks"] > 0 for r in hit)  # selections really land in reused blocks
    # the reused physical blocks are request 0's: D is the cache the engine really has
    phys0 = {}
    for r in recs:
        if r["request_id"] == 0:
            phys0.update(zip(r["selected_block_ids"], r["physical_block_ids"]))
    for r in hit:
        for lb, pb in zip(r["selected_block_ids"], r["physical_block_ids"]):
            if lb < 3 and lb in phys0:
                assert pb == phys0[lb]
    tiers = {t for r in recs for t, v in r["kv_fetch"].items() if v["hit_blocks"] > 0}
    assert {"hbm", "dram"} <= tiers  # HBM holds 12 (layer, block) pairs: the rest is fetched from below
    summary = json.loads((tmp_path / "eng" / "block16" / "summary.json").read_text())
    assert summary["requests_with_prefix_hit"] == 3 and summary["kv_fetch_totals"]["dram"]["bytes_read"] > 0
