"""Per-(request, layer) statistics of top-k selections: pure, vectorised numpy functions over sorted rows.

Input rows are already sorted (on the GPU with torch.sort, or on the CPU with numpy's SIMD sort, which is ~20x
faster than torch's CPU sort for this shape), so every statistic is a few linear passes; nothing loops per element
or per row in Python.

Conventions (the seed's, see docs/schema.md):
* a row is one (request, layer) selection of K positions; entries outside ``[0, seq_len)`` (e.g. ``-1`` padding
  when the context is shorter than K) are ignored; duplicates count once in unique_token_pos_count;
* offset = ``seq_len - 1 - pos`` (0 = the newest token); percentiles interpolate linearly (numpy's default);
* logical block = ``pos // block_size``; total_blocks_in_use = ``ceil(seq_len / block_size)``;
* tokens_per_touched_block = selected tokens in each touched block (mean, p50, p95 over the row's blocks);
* block_runs = maximal runs of consecutive touched block ids (one coalesced read each); physical_block_runs the
  same over the physical ids in logical order;
* prefix_intersection_blocks = touched blocks among the request's first ``prefix_blocks`` (prefix-cache) blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BASE_COLUMNS: tuple[str, ...] = (
    "seq_len_current",
    "unique_token_pos_count",
    "offset_min",
    "offset_p50",
    "offset_max",
    "unique_blocks",
    "total_blocks_in_use",
    "touched_block_ratio",
    "tokens_per_touched_block.mean",
    "tokens_per_touched_block.p50",
    "tokens_per_touched_block.p95",
    "block_runs",
    "prefix_intersection_blocks",
)
PHYSICAL_COLUMNS: tuple[str, ...] = ("physical_block_runs",)
SCORE_COLUMNS: tuple[str, ...] = ("scores.min", "scores.mean", "scores.max")

OFFSET_HIST_MBITS = 4  # 16 sub-buckets per power of two: <= 3.1% relative error


def stat_columns(with_physical: bool, with_scores: bool) -> tuple[str, ...]:
    return BASE_COLUMNS + (PHYSICAL_COLUMNS if with_physical else ()) + (SCORE_COLUMNS if with_scores else ())


@dataclass
class SelectionStats:
    """Statistics of R sorted selection rows. Ragged results are CSR: row r owns ``lengths[r]`` values."""

    columns: tuple[str, ...]
    matrix: np.ndarray                 # [R, len(columns)] float64
    block_ids: np.ndarray              # flat sorted unique logical block ids
    block_lengths: np.ndarray          # [R] = unique_blocks
    physical_ids: np.ndarray | None    # flat, aligned with block_ids (-1: beyond the block table)
    valid_lengths: np.ndarray          # [R] selected positions inside [0, seq_len)
    valid_mask: np.ndarray             # [R, K] bool, True where the sorted position is inside [0, seq_len)
    offset_hist: np.ndarray | None     # [G, NB] offsets per bucket per row group (see offset_buckets)

    def column(self, name: str) -> np.ndarray:
        return self.matrix[:, self.columns.index(name)]


def offset_bucket_bounds(mbits: int = OFFSET_HIST_MBITS, max_value: float = float(1 << 30)) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ids and lower bounds of the offsets histogram: bucket 0 holds 0; the others are float32 bit patterns
    truncated to ``mbits`` mantissa bits (``bucket << (23 - mbits)`` as float32 is the lower bound)."""
    shift = 23 - mbits
    one = int(np.float32(1.0).view(np.int32)) >> shift
    top = int(np.float32(max_value).view(np.int32)) >> shift
    ids = np.concatenate(([0], np.arange(one, top + 1))).astype(np.int64)
    lows = (ids.astype(np.int32) << shift).view(np.float32).astype(np.float64)
    return ids, lows


def offset_buckets(offsets: np.ndarray, mbits: int = OFFSET_HIST_MBITS) -> np.ndarray:
    """Dense bucket index (position in offset_bucket_bounds) of non-negative integer offsets."""
    shift = 23 - mbits
    one = int(np.float32(1.0).view(np.int32)) >> shift
    b = offsets.astype(np.float32).view(np.int32) >> shift
    b -= one - 1
    np.maximum(b, 0, out=b)  # 0 -> bucket 0; no integer lies between 0 and 1
    return b


def _row_percentile_from_hist(cum: np.ndarray, n: np.ndarray, qs: tuple[float, ...]) -> np.ndarray:
    """Linear-interpolated percentiles [R, len(qs)] per row of integer samples given as cumulative histograms
    [R, W] (all quantiles in one pass over the histograms)."""
    q = np.asarray(qs, dtype=np.float64)
    p = np.maximum(n - 1, 0)[:, None] * q[None, :]
    lo = np.floor(p).astype(np.int64)
    hi = np.ceil(p).astype(np.int64)
    v_lo = (cum[:, None, :] <= lo[:, :, None]).sum(2)
    v_hi = (cum[:, None, :] <= hi[:, :, None]).sum(2)
    return np.where((n > 0)[:, None], v_lo + (v_hi - v_lo) * (p - lo), 0.0)


_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")  # numpy >= 2.0


def _row_counts(mask: np.ndarray) -> np.ndarray:
    """True values per row of a C-contiguous [R, K] bool array. Popcount over 8-byte words is ~4x faster than
    ``count_nonzero(axis=1)`` (which sums a converted copy); numpy < 2.0 or K not a multiple of 8 falls back."""
    R, K = mask.shape
    if _HAS_BITWISE_COUNT and K % 8 == 0 and mask.flags.c_contiguous and mask.dtype == np.bool_:
        return np.bitwise_count(mask.view(np.uint64)).sum(1, dtype=np.int64)
    return np.count_nonzero(mask, axis=1).astype(np.int64)


def _clamp(idx: np.ndarray, top: int) -> np.ndarray:
    """``idx`` limited to [0, top] (``np.clip`` has several times the call overhead; this runs per step)."""
    return np.minimum(np.maximum(idx, 0), top)


def _take_per_row(a: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``a[r, cols[r, j]]`` for a C-contiguous [R, K] array and [R] or [R, J] columns already inside [0, K), as
    int64: one flat ``take`` (``take_along_axis`` builds index grids and costs several times more)."""
    R, K = a.shape
    base = np.arange(R, dtype=np.int64) * K
    flat = (base + cols) if cols.ndim == 1 else (base[:, None] + cols)
    return a.ravel().take(flat).astype(np.int64)


def _count_per_row(mask: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """True values of a flat boolean CSR array, per row: one ``add.reduceat`` over the non-empty rows (a
    cumulative sum of bools into int64 costs ~15x more)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.zeros(lengths.size, dtype=np.int64)
    nonempty = lengths > 0
    if mask.size and nonempty.any():
        starts = np.cumsum(lengths) - lengths
        out[nonempty] = np.add.reduceat(np.ascontiguousarray(mask, dtype=bool).view(np.uint8), starts[nonempty],
                                        dtype=np.int64)
    return out


def _runs_per_row(flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Maximal runs of consecutive integers in each sorted-order row of a CSR array: a row's values minus its
    adjacent pairs (v, v + 1)."""
    if flat.size == 0:
        return np.zeros(lengths.size, dtype=np.int64)
    adjacent = np.zeros(flat.size, dtype=bool)
    adjacent[1:] = flat[1:] == flat[:-1] + 1
    starts = np.cumsum(lengths) - lengths
    adjacent[starts[(lengths > 0) & (starts < flat.size)]] = False  # a row's first value starts a run
    return lengths - _count_per_row(adjacent, lengths)


OFFSET_SEGMENTS = 64
_N_OFFSET_BUCKETS = offset_bucket_bounds()[0].size


def _offset_histogram(pos: np.ndarray, seq: np.ndarray, start: np.ndarray, n_valid: np.ndarray,
                      row_group: np.ndarray, n_groups: int, segments: int = OFFSET_SEGMENTS) -> np.ndarray:
    """Offsets of every selected token, bucketed, per row group, in O(R x segments) instead of O(R x K).

    Each sorted row is cut into ``segments`` runs of (nearly) equal token counts; all tokens of a run are counted
    in the bucket of the run's middle token. Counts stay exact integers and every token is counted once; a token
    is placed at most half a run (n / (2 * segments) ranks, 0.8% of a row) from its own rank, on top of the
    buckets' 3.1% value resolution. Rows of at most ``segments`` tokens are bucketed exactly."""
    R, K = pos.shape
    nb_hist = _N_OFFSET_BUCKETS
    i = np.arange(segments + 1)
    edges = (n_valid[:, None] * i[None, :]) // segments             # [R, S+1] rank boundaries
    weight = np.diff(edges, axis=1)                                   # tokens per run (sum = n_valid)
    mid = start[:, None] + (edges[:, :-1] + edges[:, 1:] - 1) // 2  # middle token of each run
    mid_pos = _take_per_row(pos, _clamp(mid, K - 1))
    offs = np.maximum(seq[:, None] - 1 - mid_pos, 0)
    bucket = np.minimum(offset_buckets(offs), nb_hist - 1) + (row_group * nb_hist)[:, None]
    hist = np.bincount(bucket.ravel(), weights=weight.ravel(), minlength=n_groups * nb_hist)
    return np.rint(hist).astype(np.int64).reshape(n_groups, nb_hist)


class Workspace:
    """Reusable scratch arrays for selection_statistics. Large temporaries freshly allocated every step cost page
    faults comparable to the arithmetic itself; a caller that runs many steps (the materializer) keeps one."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        n = math.prod(shape)
        buf = self._bufs.get((name, dt))
        if buf is None or buf.size < n:
            buf = self._bufs[(name, dt)] = np.empty(max(n, 1), dtype=dt)
        return buf[:n].reshape(shape)


def selection_statistics(
    pos_sorted: np.ndarray,
    seq_lens: np.ndarray,
    block_size: int,
    prefix_blocks: np.ndarray | None = None,
    block_table: np.ndarray | None = None,
    block_table_rows: np.ndarray | None = None,
    scores_sorted: np.ndarray | None = None,
    row_group: np.ndarray | None = None,
    n_groups: int = 0,
    workspace: Workspace | None = None,
) -> SelectionStats:
    """Statistics of R selections at once.

    Args:
        pos_sorted: [R, K] integer positions, each row sorted ascending (int32 is fastest).
        seq_lens: [R] tokens in context of each row's request.
        block_size: tokens per KV block.
        prefix_blocks: [R] leading blocks of the request that came from the prefix cache (default 0).
        block_table: [T, max_blocks] logical -> physical block ids, or None.
        block_table_rows: [R] which block-table row each selection row uses (default: row r uses row r).
        scores_sorted: [R, K] indexer scores aligned with ``pos_sorted``, or None.
        row_group / n_groups: [R] group (request) of each row, non-decreasing; when given, an offsets histogram
            per group is computed (``offset_hist``).
        workspace: scratch buffers reused across calls (results never alias them except ``valid_mask``, which
            is valid until the next call with the same workspace).
    """
    ws = workspace or Workspace()
    pos = np.ascontiguousarray(pos_sorted)
    R, K = pos.shape
    seq = np.asarray(seq_lens, dtype=np.int64).reshape(R)
    nonneg = np.greater_equal(pos, 0, out=ws.get("nonneg", (R, K), bool))
    valid = np.less(pos, seq[:, None].astype(pos.dtype, copy=False), out=ws.get("valid", (R, K), bool))
    valid &= nonneg
    start = K - _row_counts(nonneg)
    n_valid = _row_counts(valid)
    end = start + n_valid

    dup = np.zeros(R, dtype=np.int64)
    # scratch[:, 0] stays False so whole rows can be popcounted; columns 1.. compare each entry with its left one
    scratch = ws.get("scratch", (R, K), bool)
    scratch[:, 0] = False
    if K > 1:
        np.equal(pos[:, 1:], pos[:, :-1], out=scratch[:, 1:])
        scratch[:, 1:] &= valid[:, 1:]
        dup = _row_counts(scratch)
    unique_pos = n_valid - dup

    blk = ws.get("blk", (R, K), pos.dtype)
    if block_size & (block_size - 1) == 0:
        np.right_shift(pos, int(block_size).bit_length() - 1, out=blk)
    else:
        np.floor_divide(pos, block_size, out=blk)
    new_block = ws.get("new_block", (R, K), bool)
    np.copyto(new_block, valid)
    if K > 1:
        np.not_equal(blk[:, 1:], blk[:, :-1], out=scratch[:, 1:])
        new_block[:, 1:] &= scratch[:, 1:]
    unique_blocks = _row_counts(new_block)
    starts_flat = np.flatnonzero(new_block)  # row-major: each row's blocks in ascending order
    block_ids = blk.ravel().take(starts_flat).astype(np.int64)
    total_blocks = (seq + block_size - 1) // block_size
    ratio = unique_blocks / np.maximum(total_blocks, 1)

    has = n_valid > 0
    p = np.maximum(n_valid - 1, 0) * 0.5
    lo, hi = np.floor(p).astype(np.int64), np.ceil(p).astype(np.int64)
    # first, last and the two middle positions of each row's valid run, in one gather
    first, last, a, b = _take_per_row(pos, _clamp(np.stack([start, end - 1, start + lo, start + hi], 1), K - 1)).T
    offset_min = np.where(has, seq - 1 - last, 0)
    offset_max = np.where(has, seq - 1 - first, 0)
    offset_p50 = np.where(has, (seq - 1) - (a + (b - a) * (p - lo)), 0.0)

    # tokens per touched block: run lengths of equal block ids, summarised by a per-row histogram
    run_row = starts_flat // K if K else starts_flat
    run_end = np.empty_like(starts_flat)
    if starts_flat.size:
        run_end[:-1] = starts_flat[1:]
        last_run = np.cumsum(unique_blocks)[unique_blocks > 0] - 1
        run_end[last_run] = np.flatnonzero(unique_blocks > 0) * K + end[unique_blocks > 0]  # row's valid end
    run_len = run_end - starts_flat
    width = int(min(block_size, K) if not dup.any() else K) + 1  # duplicates can overfill a block
    hist = np.bincount(run_row * width + run_len, minlength=R * width).reshape(R, width)
    cum = np.cumsum(hist, 1)
    tpb_mean = np.where(unique_blocks > 0, n_valid / np.maximum(unique_blocks, 1), 0.0)
    tpb_p50, tpb_p95 = _row_percentile_from_hist(cum, unique_blocks, (0.5, 0.95)).T

    block_runs = _runs_per_row(block_ids, unique_blocks)
    block_row = run_row
    if prefix_blocks is None:
        prefix_inter = np.zeros(R, dtype=np.int64)
    else:
        pb = np.asarray(prefix_blocks, dtype=np.int64).reshape(R)
        prefix_inter = (_count_per_row(block_ids < pb[block_row], unique_blocks) if pb.any()
                        else np.zeros(R, dtype=np.int64))

    columns = [seq, unique_pos, offset_min, offset_p50, offset_max, unique_blocks, total_blocks, ratio,
               tpb_mean, tpb_p50, tpb_p95, block_runs, prefix_inter]
    names = list(BASE_COLUMNS)

    physical = None
    if block_table is not None:
        bt = np.asarray(block_table)
        nb = bt.shape[1]
        trow = np.arange(R) if block_table_rows is None else np.asarray(block_table_rows, dtype=np.int64)
        # one flat take (2-D fancy indexing with masks cost ~4x more); ids past the table's width read -1
        if nb == 0:
            physical = np.full(block_ids.shape, -1, dtype=np.int64)
        else:
            flat = trow[block_row] * nb
            flat += np.minimum(block_ids, nb - 1)
            physical = np.ascontiguousarray(bt).ravel().take(flat).astype(np.int64, copy=False)
            outside = block_ids >= nb
            if outside.any():
                physical[outside] = -1
        columns.append(_runs_per_row(physical, unique_blocks))
        names += PHYSICAL_COLUMNS

    if scores_sorted is not None:
        s = np.asarray(scores_sorted, dtype=np.float64)
        smin = np.where(valid, s, np.inf).min(1)
        smax = np.where(valid, s, -np.inf).max(1)
        smean = np.where(valid, s, 0.0).sum(1) / np.maximum(n_valid, 1)
        columns += [np.where(has, smin, 0.0), np.where(has, smean, 0.0), np.where(has, smax, 0.0)]
        names += SCORE_COLUMNS

    offset_hist = None
    if row_group is not None:
        offset_hist = _offset_histogram(pos, seq, start, n_valid, np.asarray(row_group, dtype=np.int64).reshape(R),
                                        max(n_groups, 1))

    matrix = np.ascontiguousarray(np.array(columns, dtype=np.float64).T)  # [R, columns]
    return SelectionStats(columns=tuple(names), matrix=matrix, block_ids=block_ids, block_lengths=unique_blocks,
                          physical_ids=physical, valid_lengths=n_valid, valid_mask=valid, offset_hist=offset_hist)
