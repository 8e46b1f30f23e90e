import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsa_otel.sketch import LogSketch
from dsa_otel.stats import offset_bucket_bounds, selection_statistics, stat_columns
from reference import row_reference


@st.composite
def selections(draw):
    R = draw(st.integers(1, 6))
    K = draw(st.integers(1, 40))
    bs = draw(st.sampled_from([1, 4, 16, 64]))
    rows, seqs, prefixes = [], [], []
    for _ in range(R):
        seq = draw(st.integers(1, 600))
        row = draw(st.lists(st.integers(-1, seq + 5), min_size=K, max_size=K))
        rows.append(row)
        seqs.append(seq)
        prefixes.append(draw(st.integers(0, 12)))
    return np.array(rows, dtype=np.int64), np.array(seqs), np.array(prefixes), bs


@settings(max_examples=150, deadline=None)
@given(selections())
def test_statistics_match_the_reference(sel):
    raw, seqs, prefixes, bs = sel
    R, K = raw.shape
    table = np.stack([np.random.default_rng(r).permutation(2000)[:300] for r in range(R)])
    scores = np.random.default_rng(1).standard_normal(raw.shape)
    order = np.argsort(raw, 1, kind="stable")
    pos = np.take_along_axis(raw, order, 1).astype(np.int32)
    sc = np.take_along_axis(scores, order, 1)
    ids, lows = offset_bucket_bounds()
    out = selection_statistics(pos, seqs, bs, prefix_blocks=prefixes, block_table=table, scores_sorted=sc,
                               row_group=np.arange(R), n_groups=R)
    cols = stat_columns(True, True)
    assert out.columns == cols
    boff = np.concatenate(([0], np.cumsum(out.block_lengths)))
    for r in range(R):
        ref = row_reference(raw[r], int(seqs[r]), bs, int(prefixes[r]), table[r], scores[r])
        got = dict(zip(cols, out.matrix[r]))
        for k in ("seq_len_current", "unique_token_pos_count", "offset_min", "offset_max", "unique_blocks",
                  "total_blocks_in_use", "block_runs"):
            assert got[k] == ref[k], k
        assert got["offset_p50"] == pytest.approx(ref["offset_p50"])
        assert got["touched_block_ratio"] == pytest.approx(ref["touched_block_ratio"])
        for q in ("mean", "p50", "p95"):
            assert got[f"tokens_per_touched_block.{q}"] == pytest.approx(ref["tokens_per_touched_block"][q])
        assert got["prefix_intersection_blocks"] == ref["prefix"]["intersection_blocks"]
        assert out.block_ids[boff[r]:boff[r + 1]].tolist() == ref["selected_block_ids"]
        assert out.physical_ids[boff[r]:boff[r + 1]].tolist() == ref["physical_block_ids"]
        assert got["physical_block_runs"] == ref["physical_block_runs"]
        if ref["unique_token_pos_count"]:
            assert got["scores.max"] == pytest.approx(ref["scores_stats"]["max"])
            assert got["scores.min"] == pytest.approx(ref["scores_stats"]["min"])
        expect = np.zeros(ids.size, dtype=np.int64)  # rows of <= 64 tokens are bucketed exactly
        for o in ref["offsets"]:
            expect[np.searchsorted(lows, o, side="right") - 1] += 1
        assert out.offset_hist[r].tolist() == expect.tolist()


def test_physical_ids_follow_block_table_rows_and_read_minus_one_past_the_table():
    pos = np.sort(np.array([[0, 70, 130, 700], [5, 64, 200, 250], [1, 2, 3, 4]], dtype=np.int32), 1)
    seqs = np.array([800, 300, 10])
    table = np.array([[10, 11, 12, 13], [20, 21, 22, 23]])
    rows = np.array([1, 0, 1])  # selection row -> block-table row
    out = selection_statistics(pos, seqs, 64, block_table=table, block_table_rows=rows)
    boff = np.concatenate(([0], np.cumsum(out.block_lengths)))
    got = [out.physical_ids[boff[r]:boff[r + 1]].tolist() for r in range(3)]
    assert got == [[20, 21, 22, -1], [10, 11, 13], [20]]  # block 10 of row 0 lies past the 4-wide table
    empty = selection_statistics(pos, seqs, 64, block_table=np.zeros((2, 0), dtype=np.int64), block_table_rows=rows)
    assert (empty.physical_ids == -1).all() and empty.physical_ids.size == out.block_ids.size


def test_offset_histogram_of_long_rows_counts_every_token_with_bounded_rank_error():
    rng = np.random.default_rng(5)
    R, K, seq = 6, 2048, 40000
    pos = np.sort(np.stack([rng.choice(seq, K, replace=False) for _ in range(R)]), 1).astype(np.int32)
    pos[0, :100] = -1  # padding
    pos.sort(1)
    out = selection_statistics(pos, np.full(R, seq), 64, row_group=np.zeros(R, np.int64), n_groups=1)
    ids, lows = offset_bucket_bounds()
    hist = out.offset_hist[0]
    assert hist.sum() == (pos >= 0).sum()  # every valid token counted once
    exact = np.sort(np.concatenate([seq - 1 - r[r >= 0] for r in pos]))
    cum = np.cumsum(hist)
    for q in (0.1, 0.5, 0.9):
        b = np.searchsorted(cum, q * cum[-1])
        lo, hi = lows[b], lows[b + 1]
        rank_lo = np.searchsorted(exact, lo) / exact.size
        rank_hi = np.searchsorted(exact, hi) / exact.size
        assert rank_lo - 0.01 <= q <= rank_hi + 0.01  # the bucket holding quantile q brackets rank q (+-1%)


def test_sketch_error_bound_and_fixed_memory():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.exponential(300, 50000), rng.integers(0, 5, 1000), [0.0]])
    s = LogSketch()
    size = s.counts.nbytes
    for chunk in np.array_split(values, 17):
        s.add(chunk)
    assert s.counts.nbytes == size
    assert s.count == values.size and s.min == values.min() and s.max == values.max()
    assert s.total / s.count == pytest.approx(values.mean())
    for q in (0.05, 0.5, 0.95, 0.99):
        exact = np.quantile(values, q, method="inverted_cdf")
        assert abs(s.quantile(q) - exact) <= s.relative_error * exact + 1e-9 + 1, q


def test_sketch_rejects_negative_and_nan():
    with pytest.raises(ValueError):
        LogSketch().add([-1.0])
    with pytest.raises(ValueError):
        LogSketch().add([float("nan")])


def test_summary_batches_steps_without_changing_the_result(monkeypatch):
    """SummaryAccumulator folds buffered steps into its sketches in batches: folding every step, every 3 steps, or
    only at the end gives the same summary, and its counts and totals are those of the steps fed."""
    from dsa_otel import semconv as sc
    from dsa_otel.summary import SummaryAccumulator
    from dsa_otel.wire import StepPayload

    rng = np.random.default_rng(4)
    columns = ("unique_blocks", "touched_block_ratio", "tokens_per_touched_block.mean", "offset_p50", "offset_min",
               "offset_max", "prefix_intersection_blocks", "kv_fetch.hbm.bytes_read")
    steps = []
    for i in range(10):
        n = 2 + i % 4  # payloads of different row counts, some without a histogram, two resolutions
        stats = rng.integers(1, 50, size=(n, len(columns))).astype(np.float64)
        stats[:, 1] = rng.random(n)
        buckets = np.unique(rng.integers(100, 200, size=5)) if i % 4 != 3 else np.zeros(0, dtype=np.int64)
        p = StepPayload(layer_ids=np.arange(n), columns=columns, stats=stats, offset_hist_mbits=3 + (i % 5 == 0),
                        offset_hist_buckets=buckets, offset_hist_counts=np.full(buckets.size, 2))
        steps.append(({sc.REQUEST_ID: i % 3, sc.PREFIX_CACHED_BLOCKS: 2 if i % 2 else 0}, p))

    def summary(batch: int) -> dict:
        monkeypatch.setattr(SummaryAccumulator, "BATCH_STEPS", batch)
        acc = SummaryAccumulator()
        for attrs, p in steps:
            acc.add_step(attrs, p)
        return acc.to_json()

    def rounded(x):  # folding in batches sums in another order: means may differ in the last bits
        if isinstance(x, float):
            return float(f"{x:.12g}")
        if isinstance(x, dict):
            return {k: rounded(v) for k, v in x.items()}
        return [rounded(v) for v in x] if isinstance(x, list) else x

    each, threes, once = summary(1), summary(3), summary(10_000)
    assert rounded(each) == rounded(threes) == rounded(once)
    n_rows = sum(p.layer_ids.size for _, p in steps)
    hit_rows = sum(p.layer_ids.size for attrs, p in steps if attrs[sc.PREFIX_CACHED_BLOCKS])
    assert once["records"] == n_rows and once["steps"] == 10 and once["requests"] == 3
    assert once["unique_blocks"]["count"] == n_rows and once["prefix_intersection_ratio"]["count"] == hit_rows
    offsets_min = min(p.stats[:, 4].min() for _, p in steps if p.offset_hist_buckets.size)
    assert once["offsets"]["min"] == offsets_min
    assert once["offsets"]["count"] == sum(int(p.offset_hist_counts.sum()) for _, p in steps)
    assert once["kv_fetch_totals"]["hbm"]["bytes_read"] == sum(float(p.stats[:, 7].sum()) for _, p in steps)
