"""summary.json: the seed's run-level distributions, accumulated with bounded memory.

Fed one decoded step payload at a time (by the JSONL exporter, whichever way the spans arrived), so the summary of
a run written directly and of the same run received over OTLP are identical.

Distributions (each {count, min, p50, p95, max, mean}, see dsa_otel.sketch for the error bound):
  unique_blocks, touched_block_ratio, tokens_per_touched_block (the record's mean): over records;
  offset_p50: over records; offsets: over every selected token (3.1% relative error from the payload histogram);
  prefix_intersection_ratio: over records of requests that hit the prefix cache.
hot_prefix_blocks: per request, the 20 most touched blocks of its cached prefix ([block, touches] pairs).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from . import semconv as sc
from .sketch import LogSketch
from .wire import StepPayload

DISTRIBUTIONS = ("unique_blocks", "touched_block_ratio", "tokens_per_touched_block", "offset_p50", "offsets",
                 "prefix_intersection_ratio")
SUMMARY_SCHEMA_VERSION = 1


class SummaryAccumulator:
    """Run-level distributions. Steps are buffered and folded into the sketches ``BATCH_STEPS`` at a time: one
    sketch update per batch instead of several numpy calls per (request, step) payload, which is what the
    exporter's thread spends its time on at large batches (results are identical; ``to_json`` folds the rest)."""

    BATCH_STEPS = 256

    def __init__(self) -> None:
        self.sketches = {name: LogSketch(integers=name in ("unique_blocks", "offsets")) for name in DISTRIBUTIONS}
        self.records = 0
        self.steps = 0
        self.requests: set[int] = set()
        self.requests_completed = 0
        self.requests_with_prefix_hit = 0
        self.hot_prefix_blocks: dict[str, list[list[int]]] = {}
        self.kv_totals: dict[str, dict[str, float]] = {}
        self._pending: list[tuple[StepPayload, bool]] = []

    def add_step(self, attrs: Mapping[str, Any], p: StepPayload) -> None:
        n = p.layer_ids.size
        if n == 0:
            return
        self.records += n
        self.steps += 1
        self.requests.add(int(attrs[sc.REQUEST_ID]))
        self._pending.append((p, int(attrs.get(sc.PREFIX_CACHED_BLOCKS, 0)) > 0))
        if len(self._pending) >= self.BATCH_STEPS:
            self._fold()

    def _fold(self) -> None:
        """Add the buffered payloads to the sketches and totals, grouped by column layout (one layout per run in
        practice)."""
        pending, self._pending = self._pending, []
        by_layout: dict[tuple[str, ...], list[tuple[StepPayload, bool]]] = {}
        for p, hit in pending:
            by_layout.setdefault(tuple(p.columns), []).append((p, hit))
        for columns, items in by_layout.items():
            col = {c: i for i, c in enumerate(columns)}
            stats = np.concatenate([p.stats for p, _ in items])
            ub = stats[:, col["unique_blocks"]]
            self.sketches["unique_blocks"].add(ub)
            self.sketches["touched_block_ratio"].add(stats[:, col["touched_block_ratio"]])
            self.sketches["tokens_per_touched_block"].add(stats[:, col["tokens_per_touched_block.mean"]])
            self.sketches["offset_p50"].add(stats[:, col["offset_p50"]])
            # each payload's rows in ``stats``, for per-payload selections without a numpy call per payload
            n_rows = [p.layer_ids.size for p, _ in items]
            payload_of_row = np.repeat(np.arange(len(items)), n_rows)
            mbits_of = np.array([p.offset_hist_mbits if p.offset_hist_buckets.size else -1 for p, _ in items])
            for mbits in sorted(set(mbits_of.tolist()) - {-1}):
                same = [p for (p, _), m in zip(items, mbits_of) if m == mbits]
                rows = mbits_of[payload_of_row] == mbits
                self.sketches["offsets"].add_bucketed(
                    np.concatenate([p.offset_hist_buckets for p in same]),
                    np.concatenate([p.offset_hist_counts for p in same]), mbits,
                    float(stats[rows, col["offset_min"]].min()), float(stats[rows, col["offset_max"]].max()))
            hit_rows = np.repeat(np.array([hit for _, hit in items], dtype=bool), n_rows)
            if hit_rows.any():
                inter = stats[hit_rows, col["prefix_intersection_blocks"]]
                ubh = ub[hit_rows]
                self.sketches["prefix_intersection_ratio"].add(np.where(ubh > 0, inter / np.maximum(ubh, 1), 0.0))
            for c, i in col.items():
                if c.startswith("kv_fetch."):
                    _, tier, field = c.split(".", 2)
                    t = self.kv_totals.setdefault(tier, {})
                    t[field] = t.get(field, 0.0) + float(stats[:, i].sum())

    def add_request_end(self, attrs: Mapping[str, Any]) -> None:
        self.requests_completed += 1
        rid = str(int(attrs.get(sc.REQUEST_ID, -1)))
        blocks = attrs.get(sc.HOT_PREFIX_BLOCKS)
        touches = attrs.get(sc.HOT_PREFIX_TOUCHES)
        if blocks:
            self.hot_prefix_blocks[rid] = [[int(b), int(c)] for b, c in zip(blocks, touches or [])]

    def add_prefill(self, attrs: Mapping[str, Any]) -> None:
        if attrs.get(sc.PREFIX_HIT):
            self.requests_with_prefix_hit += 1

    def merge(self, other: "SummaryAccumulator") -> None:
        """Add another accumulator's run (several worker processes, each with a share of the requests)."""
        self._fold()
        other._fold()
        for name, sk in self.sketches.items():
            sk.merge(other.sketches[name])
        self.records += other.records
        self.steps += other.steps
        self.requests |= other.requests
        self.requests_completed += other.requests_completed
        self.requests_with_prefix_hit += other.requests_with_prefix_hit
        self.hot_prefix_blocks.update(other.hot_prefix_blocks)
        for tier, fields in other.kv_totals.items():
            mine = self.kv_totals.setdefault(tier, {})
            for f, v in fields.items():
                mine[f] = mine.get(f, 0.0) + v

    def to_json(self, tracing: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self._fold()
        dists = {name: s.to_json() for name, s in self.sketches.items()}
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "records": self.records,
            "steps": self.steps,
            "requests": len(self.requests),
            "requests_completed": self.requests_completed,
            "requests_with_prefix_hit": self.requests_with_prefix_hit,
            **dists,
            "distributions": dists,
            "kv_fetch_totals": self.kv_totals,
            "hot_prefix_blocks": self.hot_prefix_blocks,
            "sketch_relative_error": {name: s.relative_error if name != "offsets" else 2.0 ** -5
                                      for name, s in self.sketches.items()},
            "tracing": dict(tracing or {}),
        }
