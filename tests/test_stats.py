import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dsa_otel.sketch import LogSketch
from dsa_otel.stats import PAD_BLOCK, offset_bucket_bounds, stat_columns, step_statistics
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
def test_tensor_statistics_match_the_reference(sel):
    raw, seqs, prefixes, bs = sel
    R, K = raw.shape
    table = np.stack([np.random.default_rng(r).permutation(2000)[:700] for r in range(R)])
    scores = np.random.default_rng(1).standard_normal(raw.shape)
    order = np.argsort(raw, 1, kind="stable")
    pos = np.take_along_axis(raw, order, 1)
    sc = np.take_along_axis(scores, order, 1)
    ids, lows = offset_bucket_bounds()
    out = step_statistics(torch.from_numpy(pos), torch.from_numpy(seqs), bs, prefix_blocks=torch.from_numpy(prefixes),
                          block_table=torch.from_numpy(table), scores_sorted=torch.from_numpy(sc))
    cols = stat_columns(True, True)
    s = out.stats.numpy()
    for r in range(R):
        ref = row_reference(raw[r], int(seqs[r]), bs, int(prefixes[r]), table[r], scores[r])
        got = dict(zip(cols, s[r]))
        for k in ("seq_len_current", "unique_token_pos_count", "offset_min", "offset_max", "unique_blocks",
                  "total_blocks_in_use", "block_runs", "physical_block_runs"):
            assert got[k] == ref[k], k
        assert got["offset_p50"] == pytest.approx(ref["offset_p50"])
        assert got["touched_block_ratio"] == pytest.approx(ref["touched_block_ratio"])
        for q in ("mean", "p50", "p95"):
            assert got[f"tokens_per_touched_block.{q}"] == pytest.approx(ref["tokens_per_touched_block"][q])
        assert got["prefix_intersection_blocks"] == ref["prefix"]["intersection_blocks"]
        ub = out.unique_blocks[r].numpy()
        assert ub[ub != PAD_BLOCK].tolist() == ref["selected_block_ids"]
        ph = out.physical_blocks[r].numpy()
        assert ph[ph >= 0].tolist() == ref["physical_block_ids"]
        if ref["unique_token_pos_count"] and len(set(raw[r][(raw[r] >= 0) & (raw[r] < seqs[r])])) == \
                len(raw[r][(raw[r] >= 0) & (raw[r] < seqs[r])]):
            assert got["scores.max"] == pytest.approx(ref["scores_stats"]["max"])
        # offset histogram: every offset in the bucket whose bounds contain it
        hist = out.offset_hist[r].numpy()
        expect = np.zeros_like(hist)
        for o in ref["offsets"]:
            expect[np.searchsorted(lows, o, side="right") - 1] += 1
        assert hist.tolist() == expect.tolist()


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
