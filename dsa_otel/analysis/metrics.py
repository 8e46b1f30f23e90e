"""Locality metrics of block-selection streams: pure functions over numpy arrays.

A *step stream* is the list of touched-block sets of one (request, layer) in decode order, each a sorted array of
unique block ids. Definitions (docs/analysis.md):

* overlap(t)  = |S_t ∩ S_{t-1}| / |S_t|: share of this step's blocks already touched at the previous step
  (a window of W blocks sliding by one block per step gives 1 - 1/W);
* jaccard(t)  = |S_t ∩ S_{t-1}| / |S_t ∪ S_{t-1}|;
* reuse distance of an access = steps since the same (request, layer, block) was last touched (cold: -1);
* working set(t, W) = |S_{t-W+1} ∪ ... ∪ S_t|.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def intersection_size(a: np.ndarray, b: np.ndarray) -> int:
    """|a ∩ b| for sorted arrays of unique values."""
    if a.size == 0 or b.size == 0:
        return 0
    idx = np.searchsorted(b, a)
    idx[idx == b.size] = 0
    return int(np.count_nonzero(b[idx] == a))


def consecutive_overlap(sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(overlap, jaccard) between each step and the previous one; len(sets) - 1 values each."""
    n = len(sets) - 1
    overlap = np.zeros(max(n, 0))
    jac = np.zeros(max(n, 0))
    for t in range(1, len(sets)):
        a, b = sets[t], sets[t - 1]
        inter = intersection_size(a, b)
        union = a.size + b.size - inter
        overlap[t - 1] = inter / a.size if a.size else 1.0
        jac[t - 1] = inter / union if union else 1.0
    return overlap, jac


def flatten_steps(sets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(block ids, step index) of every access of a step stream, in order."""
    if not sets:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lengths = np.array([s.size for s in sets])
    return (np.concatenate(sets).astype(np.int64), np.repeat(np.arange(len(sets)), lengths))


def reuse_distances(sets: Sequence[np.ndarray]) -> np.ndarray:
    """Steps since each access's block was last touched in this stream (-1 = first touch). Vectorised: sort
    accesses by (block, step) and difference neighbours."""
    blocks, steps = flatten_steps(sets)
    if blocks.size == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((steps, blocks))
    b, s = blocks[order], steps[order]
    dist = np.full(b.size, -1, dtype=np.int64)
    same = np.zeros(b.size, dtype=bool)
    same[1:] = b[1:] == b[:-1]
    dist[same] = s[1:][same[1:]] - s[:-1][same[1:]]
    out = np.empty_like(dist)
    out[order] = dist
    return out


def working_set_sizes(sets: Sequence[np.ndarray], window: int) -> np.ndarray:
    """|union of the last ``window`` steps' blocks| at every step (vectorised through reuse distances: a block
    counts at step t if its latest touch at or before t is within the window)."""
    if window < 1:
        raise ValueError("window must be >= 1")
    blocks, steps = flatten_steps(sets)
    n = len(sets)
    if blocks.size == 0:
        return np.zeros(n, np.int64)
    # each access (block b at step s) keeps b in the working set for steps s .. min(next touch, s + window) - 1
    order = np.lexsort((steps, blocks))
    b, s = blocks[order], steps[order]
    nxt = np.full(b.size, np.iinfo(np.int64).max)
    same = b[1:] == b[:-1]
    nxt[:-1][same] = s[1:][same]
    end = np.minimum(s + window, nxt)
    end = np.minimum(end, n)
    delta = np.zeros(n + 1, np.int64)
    np.add.at(delta, s, 1)
    np.add.at(delta, end, -1)
    return np.cumsum(delta)[:n]


def prefix_share(sets: Sequence[np.ndarray], prefix_blocks: int) -> np.ndarray:
    """Share of each step's touched blocks that lie in the request's cached prefix (blocks < prefix_blocks)."""
    out = np.zeros(len(sets))
    for t, s in enumerate(sets):
        out[t] = np.count_nonzero(s < prefix_blocks) / s.size if s.size else 0.0
    return out
