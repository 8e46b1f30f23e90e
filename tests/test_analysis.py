"""Analysis: metrics with answers known by construction, cache policies against brute force, and the
`dsa-otel analyze` outputs on a real traced run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.analysis.cache import (lru_hit_rates, lru_stack_distances, simulate_belady, simulate_lfu, what_if)
from dsa_otel.analysis.metrics import consecutive_overlap, reuse_distances, working_set_sizes


def sliding(n_steps: int, W: int) -> list[np.ndarray]:
    return [np.arange(t, t + W) for t in range(n_steps)]


@pytest.mark.parametrize("W", [1, 4, 10, 64])
def test_sliding_window_metrics(W):
    sets = sliding(30, W)
    overlap, jac = consecutive_overlap(sets)
    assert np.allclose(overlap, 1 - 1 / W) and np.allclose(jac, (W - 1) / (W + 1))
    d = reuse_distances(sets)
    assert (d[d >= 0] == 1).all() and np.count_nonzero(d < 0) == W + 29  # each block first seen once
    for window in (1, 3, 8):
        ws = working_set_sizes(sets, window)
        assert ws.tolist() == [W + min(t, window - 1) for t in range(30)]


def naive_lru(keys, C):
    c, h = OrderedDict(), 0
    for x in keys:
        if x in c:
            h += 1
            c.move_to_end(x)
        else:
            if len(c) >= C:
                c.popitem(last=False)
            c[x] = 1
    return h


def brute_force_optimal(keys, C):
    """Max hits over every eviction choice (tiny streams only)."""
    best = 0

    def go(i, cache, hits):
        nonlocal best
        if i == len(keys):
            best = max(best, hits)
            return
        k = keys[i]
        if k in cache:
            go(i + 1, cache, hits + 1)
        elif len(cache) < C:
            go(i + 1, cache | {k}, hits)
        else:
            for v in cache:
                go(i + 1, (cache - {v}) | {k}, hits)

    go(0, frozenset(), 0)
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), max_size=300), st.integers(1, 12))
def test_lru_stack_distances_equal_a_naive_lru(keys, C):
    arr = np.array(keys, dtype=np.int64)
    assert round(lru_hit_rates(lru_stack_distances(arr), [C])[0] * max(len(keys), 1)) == naive_lru(keys, C) or not keys


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=10), st.integers(1, 3))
def test_belady_is_optimal_and_never_below_lru_or_lfu(keys, C):
    arr = np.array(keys, dtype=np.int64)
    b = simulate_belady(arr, C)
    assert b == brute_force_optimal(keys, C)
    assert b >= naive_lru(keys, C) and b >= simulate_lfu(arr, C)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 200), min_size=1, max_size=2000))
def test_belady_never_below_lru_on_larger_streams(keys):
    wi = what_if(np.array(keys), [1, 4, 16, 64])
    assert all(b >= l - 1e-12 for b, l in zip(wi.belady, wi.lru))
    assert all(0 <= x <= 1 for x in wi.lru + wi.lfu + wi.belady)


def test_budget_at_least_the_working_set_hits_everything_but_cold_misses():
    keys = np.tile(np.arange(50), 20)  # a cyclic working set of 50 blocks
    wi = what_if(keys, [10, 49, 50, 80])
    assert wi.cold == 50
    assert wi.lru_warm[2] == wi.lru_warm[3] == 1.0 and wi.belady_warm[2] == 1.0
    assert wi.lru[1] == 0.0  # LRU's cyclic cliff one block short
    assert wi.budget_for["lru_warm"]["0.99"] == 50
    assert wi.lfu[3] == pytest.approx(950 / 1000)


def traced_sliding_run(out_dir, W=8, steps=20, layers=3, n_requests=4, block_size=16):
    cfg = TraceConfig(out_dir=out_dir, run_name="slide", kv_block_size=block_size, detail="full", ring_slots=64)
    tracer = DSATracer(cfg)
    rids = list(range(n_requests))
    tracer.record_prefix(1, cached_blocks=2)
    for t in range(steps):
        seq = torch.full((n_requests,), 64 * block_size)
        # each step touches blocks t .. t+W-1, one token (the block's first) per block
        idx = (torch.arange(t, t + W) * block_size).repeat(n_requests, 1)
        for layer in range(layers):
            tracer.record_topk(layer, idx, seq, rids, step=t)
        tracer.end_step()
    for r in rids:
        tracer.end_request(r)
    tracer.shutdown()
    return cfg


def test_analyze_command_on_a_traced_run(tmp_path):
    import pyarrow.parquet as pq

    traced_sliding_run(str(tmp_path))
    out = tmp_path / "an"
    exe = os.path.join(os.path.dirname(sys.executable), "dsa-otel")
    res = subprocess.run([exe, "analyze", os.path.join(str(tmp_path), "slide"), "--out", str(out), "--window", "4",
                          "--budgets", "4", "8", "24", "30", "48"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "shards" in res.stderr  # progress
    a = json.loads((out / "analysis.json").read_text())
    assert a["records"] == 4 * 20 * 3 and a["requests"] == 4 and a["decode_tokens"] == 80
    for layer in a["per_layer"]:
        assert layer["overlap_prev_step"] == pytest.approx(1 - 1 / 8)
        assert layer["unique_blocks"]["mean"] == 8
    for layer in a["per_layer"][:-1]:  # every layer touches the same blocks; the last has no next layer
        assert layer["jaccard_next_layer"] == pytest.approx(1.0)
    assert a["per_layer"][-1]["jaccard_next_layer"] is None
    ws = a["working_set_blocks"]
    assert ws["mean_by_step"][-1] == pytest.approx(3 * (8 + 3))  # 3 layers x (W + window - 1)
    assert a["reuse_distance_steps"]["p50"] == 1
    # request 1 cached 2 blocks: only its first two steps touch them
    assert a["prefix_share_of_touched_blocks"] == pytest.approx((2 / 8 + 1 / 8) / 20)
    assert a["offsets"]["kind"] == "every selected token"
    c = a["cache_what_if"]
    assert c["accesses"] == 4 * 20 * 3 * 8 and c["cold"] == 4 * 3 * (8 + 19)
    per_req_layer_ws = 8  # one step's blocks; a budget holding all 3 layers' windows hits every re-reference
    assert c["lru_warm"][c["budgets"].index(24)] == 1.0 and c["lru_warm"][0] < 1.0
    assert c["belady"][c["budgets"].index(4)] >= c["lru"][c["budgets"].index(4)]
    assert per_req_layer_ws * 3 == 24
    table = pq.read_table(out / "records.parquet")
    assert table.num_rows == 240 and set(table.column_names) >= {"request_id", "overlap_prev", "jaccard_prev"}
    ov = [v for v in table.column("overlap_prev").to_pylist() if v == v]
    assert np.allclose(ov, 1 - 1 / 8)
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 5 and "data:image/png;base64," in html
    # --compare puts a second run beside the first
    traced_sliding_run(str(tmp_path / "b"), W=4)
    res = subprocess.run([exe, "analyze", os.path.join(str(tmp_path), "slide"), "--compare",
                          os.path.join(str(tmp_path / "b"), "slide"), "--out", str(tmp_path / "cmp"), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    both = json.loads((tmp_path / "cmp" / "analysis.json").read_text())
    assert len(both) == 2
    overlaps = sorted(v["per_layer"][0]["overlap_prev_step"] for v in both.values())
    assert overlaps == pytest.approx([1 - 1 / 4, 1 - 1 / 8])


def test_analyze_reports_missing_runs(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "dsa-otel")
    res = subprocess.run([exe, "analyze", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert res.returncode != 0 and "no dsa-otel shards" in res.stderr
