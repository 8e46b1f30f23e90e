"""Bounded-memory distribution sketch for summary.json.

The seed kept every value in Python lists to compute percentiles at the end; a long run grew without bound.
``LogSketch`` keeps a fixed array of counts over logarithmic buckets derived from the float32 bit pattern of each
value (exponent + the top ``mbits`` mantissa bits), plus exact count / sum / min / max.

Error: a quantile is reported as the midpoint of its bucket, clamped to [min, max], so its relative error is at
most ``2 ** -(mbits + 1)`` (mbits=7: 0.39%) for values >= 2**-126; 0 is exact. Only non-negative finite values
are accepted (every distribution dsa-otel summarises is a count, a ratio or a distance).
Memory: ``2 ** (8 + mbits)`` int64 counts (mbits=7: 256 KiB) regardless of how many values are added.
"""

from __future__ import annotations

import numpy as np


class LogSketch:
    def __init__(self, mbits: int = 7, integers: bool = False) -> None:
        """``integers``: the values are whole numbers, so quantiles are rounded to the nearest integer (exact for
        values below 2 ** (mbits + 1), where every bucket holds at most one integer)."""
        if not 0 <= mbits <= 10:
            raise ValueError("mbits must be within [0, 10]")
        self.mbits = mbits
        self.integers = integers
        self._shift = 23 - mbits
        self.counts = np.zeros(1 << (8 + mbits), dtype=np.int64)
        self.count = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = float("-inf")

    @property
    def relative_error(self) -> float:
        return 2.0 ** -(self.mbits + 1)

    def bucket_of(self, values: np.ndarray) -> np.ndarray:
        f = np.asarray(values, dtype=np.float32)
        return (f.view(np.int32) >> self._shift).astype(np.int64)

    def add(self, values: np.ndarray | list[float] | float) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        if not np.isfinite(v).all() or (v < 0).any():
            raise ValueError("LogSketch accepts only finite non-negative values")
        buckets = self.bucket_of(v)
        if v.size < 64:
            np.add.at(self.counts, buckets, 1)
        else:
            self._add_bincount(buckets)
        self.count += int(v.size)
        self.total += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))

    def _add_bincount(self, buckets: np.ndarray, weights: np.ndarray | None = None) -> None:
        self.counts += np.bincount(buckets, weights=weights, minlength=self.counts.size).astype(np.int64)

    def add_bucketed(self, buckets: np.ndarray, counts: np.ndarray, mbits: int, vmin: float, vmax: float) -> None:
        """Merge a histogram made at ``mbits`` <= self.mbits (e.g. the offsets histogram of a step payload).

        Each coarse bucket's count goes to the fine bucket holding its lower bound, so the merged error is that of
        the coarser histogram. ``vmin``/``vmax`` bound the values (for exact min/max); the sum uses bucket midpoints.
        """
        if mbits > self.mbits:
            raise ValueError("cannot merge a finer histogram into a coarser sketch")
        b = np.asarray(buckets, dtype=np.int64)
        c = np.asarray(counts, dtype=np.int64)
        if b.size == 0 or int(c.sum()) == 0:
            return
        fine = b << (self.mbits - mbits)
        self._add_bincount(fine, c.astype(np.float64))
        shift = 23 - mbits
        lo = (b.astype(np.int32) << shift).view(np.float32).astype(np.float64)
        hi = ((b + 1).astype(np.int32) << shift).view(np.float32).astype(np.float64)
        mid = np.where(b == 0, 0.0, (lo + hi) / 2)
        self.count += int(c.sum())
        self.total += float((mid * c).sum())
        self.min = min(self.min, vmin)
        self.max = max(self.max, vmax)

    def merge(self, other: "LogSketch") -> None:
        if other.mbits != self.mbits:
            raise ValueError("sketches of different resolution")
        self.counts += other.counts
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def quantile(self, q: float) -> float:
        if self.count == 0:
            return 0.0
        rank = q * (self.count - 1)
        cum = np.cumsum(self.counts)
        b = int(np.searchsorted(cum, rank, side="right"))
        lo = float(np.array([b << self._shift], dtype=np.int32).view(np.float32)[0])
        hi = float(np.array([(b + 1) << self._shift], dtype=np.int32).view(np.float32)[0])
        mid = 0.0 if b == 0 else (lo + hi) / 2
        if self.integers:
            mid = float(np.ceil(lo)) if hi - lo <= 1.0 else float(round(mid))
        return float(min(max(mid, self.min), self.max))

    def to_json(self) -> dict[str, float | int]:
        """The seed's distribution shape: {count, min, p50, p95, max, mean}."""
        if self.count == 0:
            return {"count": 0, "min": 0.0, "p50": 0.0, "p95": 0.0, "max": 0.0, "mean": 0.0}
        return {
            "count": self.count,
            "min": self.min,
            "p50": self.quantile(0.5),
            "p95": self.quantile(0.95),
            "max": self.max,
            "mean": self.total / self.count,
        }
