"""Independent per-row reference of the seed's statistics, written the slow obvious way (numpy per row).

The pipeline's vectorised tensor code must agree with this on every field."""

from __future__ import annotations

import numpy as np


def row_reference(pos_row, seq_len: int, block_size: int, prefix_blocks: int = 0, table_row=None, scores_row=None):
    pos = np.asarray(pos_row, dtype=np.int64)
    keep = (pos >= 0) & (pos < seq_len)
    sel = pos[keep]
    sc = None if scores_row is None else np.asarray(scores_row, dtype=np.float64)[keep]
    out = {"seq_len_current": seq_len}
    u = np.unique(sel)
    out["unique_token_pos_count"] = int(u.size)
    offsets = seq_len - 1 - sel
    if sel.size:
        out["offset_min"] = int(offsets.min())
        out["offset_max"] = int(offsets.max())
        out["offset_p50"] = float(np.percentile(offsets, 50))
    else:
        out["offset_min"] = out["offset_max"] = 0
        out["offset_p50"] = 0.0
    blocks = sel // block_size
    ub, counts = np.unique(blocks, return_counts=True)
    out["unique_blocks"] = int(ub.size)
    out["total_blocks_in_use"] = int(-(-seq_len // block_size))
    out["touched_block_ratio"] = ub.size / max(1, out["total_blocks_in_use"])
    if ub.size:
        out["tokens_per_touched_block"] = {"mean": float(sel.size / ub.size),
                                           "p50": float(np.percentile(counts, 50)),
                                           "p95": float(np.percentile(counts, 95))}
    else:
        out["tokens_per_touched_block"] = {"mean": 0.0, "p50": 0.0, "p95": 0.0}
    out["selected_block_ids"] = ub.tolist()
    runs = 0
    for i, b in enumerate(ub):
        if i == 0 or b != ub[i - 1] + 1:
            runs += 1
    out["block_runs"] = runs
    inter = int((ub < prefix_blocks).sum())
    out["prefix"] = {"intersection_blocks": inter, "intersection_ratio": inter / ub.size if ub.size else 0.0}
    if table_row is not None:
        phys = [int(table_row[b]) if b < len(table_row) else -1 for b in ub]  # -1: beyond the table
        out["physical_block_ids"] = phys
        pr = 0
        for i, p in enumerate(phys):
            if i == 0 or p != phys[i - 1] + 1:
                pr += 1
        out["physical_block_runs"] = pr
    out["selected_token_pos"] = np.sort(sel).tolist()
    out["offsets"] = offsets
    if sc is not None:
        out["scores_stats"] = {"min": float(sc.min()), "mean": float(sc.mean()), "max": float(sc.max())} \
            if sc.size else {"min": 0.0, "mean": 0.0, "max": 0.0}
    return out
