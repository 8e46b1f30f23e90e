"""Cache what-if: replay a block access stream through an HBM cache of a given budget (in blocks).

A stream is an int64 array of keys (one key per (request, layer, block)), in access order. Policies:

* LRU, every budget at once: Mattson's stack distance of each access (distinct keys since its previous access;
  a hit at budget C iff distance < C), computed with a Fenwick tree in O(N log N);
* LFU (in-cache frequency, least-recently-used among equals) and Belady's optimal (evict the key whose next use
  is farthest), per budget, O(N log C).

Hit rates are also reported excluding compulsory (first-touch) misses, so a budget at least the size of the
working set shows 100 %.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


def previous_access(keys: np.ndarray) -> np.ndarray:
    """Index of the previous access to the same key (-1 for the first)."""
    order = np.lexsort((np.arange(keys.size), keys))
    k = keys[order]
    prev = np.full(keys.size, -1, dtype=np.int64)
    same = np.zeros(keys.size, dtype=bool)
    same[1:] = k[1:] == k[:-1]
    prev[order[1:][same[1:]]] = order[:-1][same[1:]]
    return prev


def next_access(keys: np.ndarray) -> np.ndarray:
    """Index of the next access to the same key (len(keys) when never used again)."""
    prev = previous_access(keys)
    nxt = np.full(keys.size, keys.size, dtype=np.int64)
    has = prev >= 0
    nxt[prev[has]] = np.flatnonzero(has)
    return nxt


def lru_stack_distances(keys: np.ndarray) -> np.ndarray:
    """Number of distinct keys accessed since each access's previous access to its key (-1: first access).
    An LRU cache of C blocks hits exactly the accesses with 0 <= distance < C."""
    n = keys.size
    prev = previous_access(keys)
    tree = [0] * (n + 1)  # Fenwick tree over access times; 1 marks the latest access of a key
    dist = np.full(n, -1, dtype=np.int64)
    marked_total = 0
    prev_l = prev.tolist()  # analysis runs offline, off any model thread
    for t in range(n):
        p = prev_l[t]
        if p >= 0:
            # markers in (p, t) = total - prefix(p)  (all markers are at times < t)
            i, s = p + 1, 0
            while i > 0:
                s += tree[i]
                i -= i & -i
            dist[t] = marked_total - s
            i = p + 1
            while i <= n:
                tree[i] -= 1
                i += i & -i
            marked_total -= 1
        i = t + 1
        while i <= n:
            tree[i] += 1
            i += i & -i
        marked_total += 1
    return dist


def lru_hit_rates(distances: np.ndarray, budgets: np.ndarray) -> np.ndarray:
    """Hit rate of an LRU cache at each budget, from stack distances."""
    if distances.size == 0:
        return np.zeros(len(budgets))
    warm = np.sort(distances[distances >= 0])
    return np.searchsorted(warm, np.asarray(budgets), side="left") / distances.size


def simulate_lfu(keys: np.ndarray, budget: int) -> int:
    """Hits of an in-cache LFU cache (ties: least recently used)."""
    if budget <= 0:
        return 0
    freq: dict[int, int] = {}
    last: dict[int, int] = {}
    heap: list[tuple[int, int, int]] = []  # (freq, last use, key), lazily invalidated
    hits = 0
    for t, k in enumerate(keys.tolist()):
        if k in freq:
            hits += 1
            freq[k] += 1
        else:
            if len(freq) >= budget:
                while True:
                    f, lu, victim = heapq.heappop(heap)
                    if freq.get(victim) == f and last.get(victim) == lu:
                        del freq[victim], last[victim]
                        break
            freq[k] = 1
        last[k] = t
        heapq.heappush(heap, (freq[k], t, k))
        if len(heap) > 4 * budget + 64:  # drop stale entries
            heap = [(freq[v], last[v], v) for v in freq]
            heapq.heapify(heap)
    return hits


def simulate_belady(keys: np.ndarray, budget: int, nxt: np.ndarray | None = None) -> int:
    """Hits of Belady's optimal policy (evict the resident key whose next use is farthest)."""
    if budget <= 0:
        return 0
    nxt = next_access(keys) if nxt is None else nxt
    resident: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily invalidated
    hits = 0
    for k, nu in zip(keys.tolist(), nxt.tolist()):
        if k in resident:
            hits += 1
        elif len(resident) >= budget:
            while True:
                neg, victim = heapq.heappop(heap)
                if resident.get(victim) == -neg:
                    del resident[victim]
                    break
        resident[k] = nu
        heapq.heappush(heap, (-nu, k))
        if len(heap) > 4 * budget + 64:
            heap = [(-v, key) for key, v in resident.items()]
            heapq.heapify(heap)
    return hits


@dataclass
class WhatIf:
    budgets: list[int]
    accesses: int
    cold: int
    lru: list[float]
    lfu: list[float]
    belady: list[float]
    lru_warm: list[float]
    belady_warm: list[float]
    budget_for: dict[str, dict[str, int | None]]

    def to_json(self) -> dict:
        return dict(self.__dict__)


def what_if(keys: np.ndarray, budgets: list[int], targets: tuple[float, ...] = (0.9, 0.95, 0.99)) -> WhatIf:
    """Hit-rate curves of LRU / LFU / Belady over ``budgets`` and, from LRU's exact curve, the smallest budget
    reaching each target hit rate (None: not reachable, e.g. because of compulsory misses)."""
    keys = np.asarray(keys, dtype=np.int64)
    n = keys.size
    dist = lru_stack_distances(keys)
    cold = int(np.count_nonzero(dist < 0))
    warm_n = max(n - cold, 1)
    budgets = sorted(set(int(b) for b in budgets if b > 0))
    lru = lru_hit_rates(dist, np.array(budgets)).tolist()
    nxt = next_access(keys)
    belady_hits = [simulate_belady(keys, b, nxt) for b in budgets]
    lfu_hits = [simulate_lfu(keys, b) for b in budgets]
    warm = np.sort(dist[dist >= 0])
    budget_for: dict[str, dict[str, int | None]] = {"lru": {}}
    for q in targets:
        need = int(np.ceil(q * n))  # hits needed
        budget_for["lru"][f"{q:g}"] = int(warm[need - 1]) + 1 if 0 < need <= warm.size else (0 if need <= 0 else None)
    budget_for["lru_warm"] = {}  # the same, counting only re-references (compulsory misses excluded)
    for q in targets:
        need = int(np.ceil(q * warm.size))
        budget_for["lru_warm"][f"{q:g}"] = int(warm[need - 1]) + 1 if need > 0 else 0
    for name, hits in (("belady", belady_hits), ("lfu", lfu_hits)):
        budget_for[name] = {}
        for q in targets:
            ok = [b for b, h in zip(budgets, hits) if n and h / n >= q]
            budget_for[name][f"{q:g}"] = ok[0] if ok else None
    return WhatIf(budgets=budgets, accesses=n, cold=cold, lru=lru,
                  lfu=[h / n if n else 0.0 for h in lfu_hits], belady=[h / n if n else 0.0 for h in belady_hits],
                  lru_warm=[r * n / warm_n for r in lru], belady_warm=[h / warm_n for h in belady_hits],
                  budget_for=budget_for)
