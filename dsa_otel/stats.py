"""Per-(request, layer) statistics of top-k selections as pure, fixed-shape tensor functions.

Every function takes and returns tensors of static shape (no boolean indexing, no ``.item()``), so on CUDA the
whole computation is a short sequence of kernels on a side stream with no host synchronisation, and on the CPU it
runs in the materializer thread with the GIL released inside torch. Host-side finishing (ragged rows, JSON) lives
elsewhere.

Conventions (the seed's, see docs/schema.md):
* a row is one (request, layer) selection of K positions; entries outside ``[0, seq_len)`` (e.g. ``-1`` padding
  when the context is shorter than K) are ignored;
* offset = ``seq_len - 1 - pos`` (0 = the newest token); percentiles interpolate linearly (numpy's default);
* logical block = ``pos // block_size``; total_blocks_in_use = ``ceil(seq_len / block_size)``;
* tokens_per_touched_block = selected tokens in each touched block (mean, p50, p95 over the row's blocks);
* block_runs = maximal runs of consecutive touched logical blocks (one coalesced read each);
* prefix_intersection_blocks = touched blocks among the request's first ``prefix_blocks`` (prefix-cache) blocks.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

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

PAD_BLOCK = (1 << 31) - 1  # sorts after every real block id
OFFSET_HIST_MBITS = 4      # 16 sub-buckets per power of two: <= 3.1% relative error


class StepStats(NamedTuple):
    stats: torch.Tensor             # [R, C] float64, columns = stat_columns(...)
    unique_blocks: torch.Tensor     # [R, K] int64: sorted unique logical block ids, padded with PAD_BLOCK
    physical_blocks: torch.Tensor | None  # [R, K] int64: physical id of unique_blocks[r, j] (pad: -1)
    offset_hist: torch.Tensor       # [R, NB] int32 counts per offset bucket (see offset_bucket_bounds)


def stat_columns(with_physical: bool, with_scores: bool) -> tuple[str, ...]:
    return BASE_COLUMNS + (PHYSICAL_COLUMNS if with_physical else ()) + (SCORE_COLUMNS if with_scores else ())


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx.clamp(0, t.shape[1] - 1).unsqueeze(1)).squeeze(1)


def _row_percentile(sorted_vals: torch.Tensor, start: torch.Tensor, n: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated percentile of each row's ``sorted_vals[start:start+n]`` (0 where n == 0)."""
    p = (n - 1).clamp(min=0).double() * q
    lo = p.floor().long()
    hi = p.ceil().long()
    a = _gather(sorted_vals, start + lo).double()
    b = _gather(sorted_vals, start + hi).double()
    return torch.where(n > 0, a + (b - a) * (p - lo.double()), torch.zeros_like(p))


def offset_bucket_bounds(mbits: int = OFFSET_HIST_MBITS, max_value: float = float(1 << 24)) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ids and lower bounds of the log histogram used for offsets: bucket 0 holds 0, the others are
    float32 bit patterns truncated to ``mbits`` mantissa bits (``bucket << (23 - mbits)`` is the lower bound)."""
    shift = 23 - mbits
    one = np.float32(1.0).view(np.int32) >> shift
    top = np.float32(max_value).view(np.int32) >> shift
    ids = np.concatenate(([0], np.arange(one, top + 1))).astype(np.int64)
    lows = (ids.astype(np.int32) << shift).view(np.float32).astype(np.float64)
    return ids, lows


def step_statistics(
    pos_sorted: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    prefix_blocks: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    block_table_rows: torch.Tensor | None = None,
    scores_sorted: torch.Tensor | None = None,
    offset_bounds: torch.Tensor | None = None,
) -> StepStats:
    """Statistics of R selections at once.

    Args:
        pos_sorted: [R, K] integer positions, each row sorted ascending.
        seq_lens: [R] tokens in context of each row's request.
        block_size: tokens per KV block.
        prefix_blocks: [R] leading blocks of the request that came from the prefix cache (default 0).
        block_table: [T, max_blocks] logical -> physical block ids, or None.
        block_table_rows: [R] which block-table row each selection row uses (default: row r uses row r).
        scores_sorted: [R, K] indexer scores aligned with ``pos_sorted``, or None.
        offset_bounds: lower bounds of the offset histogram buckets (float64), see offset_bucket_bounds().
    """
    pos = pos_sorted.long()
    R, K = pos.shape
    dev = pos.device
    seq = seq_lens.to(dev).long()
    ar = torch.arange(K, device=dev).unsqueeze(0)
    valid = (pos >= 0) & (pos < seq.unsqueeze(1))
    n_valid = valid.sum(1)
    start = (pos < 0).sum(1)
    end = start + n_valid
    after_start = ar > start.unsqueeze(1)

    same_prev = torch.zeros_like(valid)
    same_prev[:, 1:] = pos[:, 1:] == pos[:, :-1]
    unique_pos = n_valid - (same_prev & valid & after_start).sum(1)

    blk = torch.div(pos, block_size, rounding_mode="floor")
    same_blk = torch.zeros_like(valid)
    same_blk[:, 1:] = blk[:, 1:] == blk[:, :-1]
    new_block = valid & ~(same_blk & after_start)
    unique_blocks = new_block.sum(1)
    total_blocks = torch.div(seq + block_size - 1, block_size, rounding_mode="floor")
    ratio = unique_blocks.double() / total_blocks.clamp(min=1).double()

    first = _gather(pos, start)
    last = _gather(pos, end - 1)
    has = n_valid > 0
    zero = torch.zeros_like(seq)
    offset_min = torch.where(has, seq - 1 - last, zero)
    offset_max = torch.where(has, seq - 1 - first, zero)
    median_pos = _row_percentile(pos, start, n_valid, 0.5)
    offset_p50 = torch.where(has, (seq - 1).double() - median_pos, torch.zeros_like(median_pos))

    # run length of each touched block = distance to the next block start (or to the end of the valid range)
    big = torch.full_like(pos, K)
    starts_at = torch.where(new_block, ar.expand(R, K), big)
    suffix_min = torch.flip(torch.cummin(torch.flip(starts_at, [1]), 1).values, [1])
    next_start = torch.cat([suffix_min[:, 1:], big[:, :1]], 1)
    next_start = torch.minimum(next_start, end.unsqueeze(1))
    run_len = torch.where(new_block, next_start - ar, torch.full_like(pos, 1 << 40))
    run_sorted = torch.sort(run_len, 1).values
    zero_start = torch.zeros_like(start)
    tpb_mean = torch.where(unique_blocks > 0, n_valid.double() / unique_blocks.clamp(min=1).double(),
                           torch.zeros_like(ratio))
    tpb_p50 = _row_percentile(run_sorted, zero_start, unique_blocks, 0.5)
    tpb_p95 = _row_percentile(run_sorted, zero_start, unique_blocks, 0.95)

    prev_blk = torch.zeros_like(blk)
    prev_blk[:, 1:] = blk[:, :-1]
    block_runs = (new_block & ~(after_start & (blk == prev_blk + 1))).sum(1)

    if prefix_blocks is None:
        prefix_inter = torch.zeros_like(unique_blocks)
    else:
        prefix_inter = (new_block & (blk < prefix_blocks.to(dev).long().unsqueeze(1))).sum(1)

    ublk = torch.sort(torch.where(new_block, blk, torch.full_like(blk, PAD_BLOCK)), 1).values
    columns = [seq, unique_pos, offset_min, offset_p50, offset_max, unique_blocks, total_blocks, ratio,
               tpb_mean, tpb_p50, tpb_p95, block_runs, prefix_inter]

    physical = None
    if block_table is not None:
        bt = block_table.to(dev).long()
        nb = bt.shape[1]
        rows = (torch.arange(R, device=dev) if block_table_rows is None else block_table_rows.to(dev).long())
        has_u = ublk != PAD_BLOCK
        col = torch.where(has_u, ublk, torch.zeros_like(ublk)).clamp(max=nb - 1)
        phys = bt.reshape(-1)[rows.unsqueeze(1) * nb + col]
        physical = torch.where(has_u & (ublk < nb), phys, torch.full_like(phys, -1))  # -1: not in the table
        prev_phys = torch.zeros_like(physical)
        prev_phys[:, 1:] = physical[:, :-1]
        first_col = ar == 0
        columns.append((has_u & (first_col | (physical != prev_phys + 1))).sum(1))

    if scores_sorted is not None:
        s = scores_sorted.to(dev).double()
        inf = torch.full_like(s, float("inf"))
        smin = torch.where(valid, s, inf).amin(1)
        smax = torch.where(valid, s, -inf).amax(1)
        smean = torch.where(valid, s, torch.zeros_like(s)).sum(1) / n_valid.clamp(min=1).double()
        columns += [torch.where(has, smin, torch.zeros_like(smin)), smean,
                    torch.where(has, smax, torch.zeros_like(smax))]

    stats = torch.stack([c.double() for c in columns], 1)

    # offsets histogram: count of valid offsets >= L is #(pos <= seq-1-L) minus the negative padding
    if offset_bounds is None:
        offset_bounds = torch.from_numpy(offset_bucket_bounds()[1])
    lows = offset_bounds.to(dev).double()
    thresholds = torch.floor(seq.double().unsqueeze(1) - 1 - lows.unsqueeze(0)).long()  # [R, NB]
    ge = (torch.searchsorted(pos.contiguous(), thresholds, right=True) - start.unsqueeze(1)).clamp(min=0)
    upper = torch.cat([ge[:, 1:], torch.zeros_like(ge[:, :1])], 1)
    hist = (ge - upper).to(torch.int32)
    return StepStats(stats=stats, unique_blocks=ublk, physical_blocks=physical, offset_hist=hist)
