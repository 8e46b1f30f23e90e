"""Stream a run's shards into locality metrics, tables and a cache what-if, with bounded memory.

Shards are read one at a time (a request never spans two shards), so per-request state lives only while its
shard is being read. What is kept for the whole run is bounded: sketches per layer, per-step means, and a sample of
the block access stream for the cache replay (whole requests, up to ``max_accesses``).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..exporters.reader import ReadReport, iter_file, read_collector_file, shard_files
from ..sketch import LogSketch
from .cache import what_if
from .metrics import consecutive_overlap, reuse_distances, working_set_sizes

RECORD_COLUMNS = ("request_id", "layer_id", "step_idx", "seq_len_current", "unique_blocks", "touched_block_ratio",
                  "tokens_per_touched_block", "offset_p50", "overlap_prev", "jaccard_prev", "prefix_share")


@dataclass
class LayerAcc:
    unique_blocks: LogSketch = field(default_factory=lambda: LogSketch(integers=True))
    touched_ratio: LogSketch = field(default_factory=LogSketch)
    tokens_per_block: LogSketch = field(default_factory=LogSketch)
    overlap_sum: float = 0.0
    jaccard_sum: float = 0.0
    pairs: int = 0
    records: int = 0
    adj_jaccard_sum: float = 0.0  # with the next layer in the same step
    adj_pairs: int = 0


@dataclass
class AnalysisConfig:
    window: int = 16
    budgets: tuple[int, ...] = ()
    max_accesses: int = 1_000_000
    block_bytes: int = 64 * 656
    heatmap_request: int | None = None
    heatmap_layer: int | None = None
    progress: bool = True


@dataclass
class RunAnalysis:
    path: str
    records: int = 0
    prefill_records: int = 0
    requests: int = 0
    decode_tokens: int = 0
    has_blocks: bool = False
    layers: dict[int, LayerAcc] = field(default_factory=dict)
    reuse: LogSketch = field(default_factory=lambda: LogSketch(integers=True))
    cold_accesses: int = 0
    offsets: LogSketch = field(default_factory=lambda: LogSketch(integers=True))
    offsets_exact: bool = False
    ws_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ws_count: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ws_sketch: LogSketch = field(default_factory=lambda: LogSketch(integers=True))
    prefix_share_sum: float = 0.0
    prefix_share_n: int = 0
    kv_totals: dict[str, dict[str, float]] = field(default_factory=dict)
    stream: list[np.ndarray] = field(default_factory=list)
    stream_len: int = 0
    stream_requests: int = 0
    stream_tokens: int = 0
    heatmap: dict[str, Any] | None = None
    per_request_lru: list[dict[str, Any]] = field(default_factory=list)
    report: ReadReport = field(default_factory=ReadReport)


def _records_by_request(records: Iterable[dict], res: "RunAnalysis") -> dict[int, list[dict]]:
    """Decode records by request; prefill records (``trace_prefill``) are counted, not mixed into decode steps."""
    out: dict[int, list[dict]] = {}
    for r in records:
        if r.get("phase", "decode") == "prefill":
            res.prefill_records += 1
            continue
        out.setdefault(int(r["request_id"]), []).append(r)
    return out


def analyze_run(path: str, cfg: AnalysisConfig, table_sink: Any = None) -> RunAnalysis:
    """Analyse every shard under ``path`` (or one Collector OTLP-JSON file)."""
    res = RunAnalysis(path=path)
    files = shard_files(path) if not os.path.isfile(path) else [path]
    if not files:
        raise FileNotFoundError(f"no dsa-otel shards under {path}")
    t0 = time.monotonic()
    request_index = 0
    for fi, f in enumerate(files):
        is_shard = os.path.basename(f).startswith("trace_steps_")
        recs = iter_file(f, res.report) if is_shard else read_collector_file(f, res.report)
        for rid, rows in sorted(_records_by_request(recs, res).items()):
            _analyze_request(res, cfg, rid, rows, request_index, table_sink)
            request_index += 1
        if cfg.progress:
            print(f"\ranalyze: {fi + 1}/{len(files)} shards, {res.records} records, "
                  f"{time.monotonic() - t0:.1f}s", end="", file=sys.stderr, flush=True)
    if cfg.progress:
        print(file=sys.stderr)
    return res


def _analyze_request(res: RunAnalysis, cfg: AnalysisConfig, rid: int, rows: list[dict], req_index: int,
                     table_sink: Any) -> None:
    res.requests += 1
    res.records += len(rows)
    steps = sorted({int(r["step_idx"]) for r in rows})
    res.decode_tokens += len(steps)
    step_pos = {s: i for i, s in enumerate(steps)}
    by_layer: dict[int, list[dict]] = {}
    for r in rows:
        by_layer.setdefault(int(r["layer_id"]), []).append(r)
        for tier, vals in (r.get("kv_fetch") or {}).items():
            acc = res.kv_totals.setdefault(tier, {})
            for k, v in vals.items():
                if isinstance(v, (int, float)) and k != "batch_size":
                    acc[k] = acc.get(k, 0.0) + float(v)
        if "selected_token_pos" in r:
            res.offsets_exact = True
            pos = np.asarray(r["selected_token_pos"], dtype=np.int64)
            res.offsets.add(r["seq_len_current"] - 1 - pos)
    if not res.offsets_exact:
        res.offsets.add([float(r["offset_p50"]) for r in rows])
    has_blocks = all("selected_block_ids" in r for r in rows)
    res.has_blocks = res.has_blocks or has_blocks
    n_steps = len(steps)
    ws_total = np.zeros(n_steps)
    stream_parts: list[np.ndarray] = []
    step_sets: dict[int, list[np.ndarray]] = {}
    table_rows: list[tuple] = []
    for layer, lrows in sorted(by_layer.items()):
        lrows.sort(key=lambda r: r["step_idx"])
        acc = res.layers.setdefault(layer, LayerAcc())
        acc.records += len(lrows)
        acc.unique_blocks.add([r["unique_blocks"] for r in lrows])
        acc.touched_ratio.add([r["touched_block_ratio"] for r in lrows])
        acc.tokens_per_block.add([r["tokens_per_touched_block"]["mean"] for r in lrows])
        overlap = jac = np.zeros(0)
        share = np.zeros(len(lrows))
        if has_blocks:
            sets = [np.asarray(r["selected_block_ids"], dtype=np.int64) for r in lrows]
            step_sets[layer] = sets
            overlap, jac = consecutive_overlap(sets)
            acc.overlap_sum += float(overlap.sum())
            acc.jaccard_sum += float(jac.sum())
            acc.pairs += overlap.size
            d = reuse_distances(sets)
            res.cold_accesses += int(np.count_nonzero(d < 0))
            res.reuse.add(d[d >= 0])
            ws = working_set_sizes(sets, cfg.window)
            idx = np.array([step_pos[int(r["step_idx"])] for r in lrows])
            ws_total[idx] += ws
            cached = int((lrows[0].get("prefix") or {}).get("prefix_cached_blocks", 0))
            if cached:
                share = np.array([np.count_nonzero(s < cached) / s.size if s.size else 0.0 for s in sets])
                res.prefix_share_sum += float(share.sum())
                res.prefix_share_n += share.size
            # access stream of this request: key = (request, layer, block)
            blocks = np.concatenate(sets) if sets else np.zeros(0, np.int64)
            stream_parts.append((np.int64(req_index) << 40) | (np.int64(layer) << 24) | blocks)
            if (cfg.heatmap_request is None or cfg.heatmap_request == rid) and res.heatmap is None and \
                    (cfg.heatmap_layer is None or cfg.heatmap_layer == layer):
                res.heatmap = {"request_id": rid, "layer_id": layer, "sets": [s.tolist() for s in sets[:512]],
                               "steps": [int(r["step_idx"]) for r in lrows[:512]],
                               "total_blocks": int(lrows[-1]["total_blocks_in_use"])}
        if table_sink is not None:
            for i, r in enumerate(lrows):
                table_rows.append((rid, layer, int(r["step_idx"]), int(r["seq_len_current"]), int(r["unique_blocks"]),
                                   float(r["touched_block_ratio"]), float(r["tokens_per_touched_block"]["mean"]),
                                   float(r["offset_p50"]), float(overlap[i - 1]) if i and overlap.size else np.nan,
                                   float(jac[i - 1]) if i and jac.size else np.nan, float(share[i])))
    # cross-layer: Jaccard of adjacent layers within the same step
    layers_sorted = sorted(step_sets)
    for a, b in zip(layers_sorted, layers_sorted[1:]):
        sa = {int(r["step_idx"]): s for r, s in zip(sorted(by_layer[a], key=lambda r: r["step_idx"]), step_sets[a])}
        sb = {int(r["step_idx"]): s for r, s in zip(sorted(by_layer[b], key=lambda r: r["step_idx"]), step_sets[b])}
        acc = res.layers[a]
        for st in sa.keys() & sb.keys():
            x, y = sa[st], sb[st]
            inter = np.intersect1d(x, y, assume_unique=True).size
            union = x.size + y.size - inter
            acc.adj_jaccard_sum += inter / union if union else 1.0
            acc.adj_pairs += 1
    if has_blocks:
        if res.ws_sum.size < n_steps:
            res.ws_sum = np.pad(res.ws_sum, (0, n_steps - res.ws_sum.size))
            res.ws_count = np.pad(res.ws_count, (0, n_steps - res.ws_count.size))
        res.ws_sum[:n_steps] += ws_total
        res.ws_count[:n_steps] += 1
        res.ws_sketch.add(ws_total)
        stream = np.concatenate(stream_parts) if stream_parts else np.zeros(0, np.int64)
        # order the request's accesses by (step, layer): the order the engine fetches them
        order_keys = []
        for layer in sorted(by_layer):
            lrows = by_layer[layer]
            order_keys.append(np.repeat(np.array([step_pos[int(r["step_idx"])] * 100000 + layer for r in lrows]),
                                        [len(r["selected_block_ids"]) for r in lrows]))
        if stream.size:
            stream = stream[np.argsort(np.concatenate(order_keys), kind="stable")]
        if res.stream_len + stream.size <= cfg.max_accesses:
            res.stream.append(stream)
            res.stream_len += stream.size
            res.stream_requests += 1
            res.stream_tokens += n_steps
    if table_sink is not None and table_rows:
        table_sink.write(table_rows)


def default_budgets(res: RunAnalysis) -> list[int]:
    """Budgets (blocks) from 1/64 of the mean per-request working set to twice the largest."""
    top = int(max(res.ws_sketch.max if res.ws_sketch.count else 1, 1))
    grid = np.unique(np.geomspace(max(1, top // 64), 2 * top, 10).astype(int))
    return grid.tolist()


def summarize(res: RunAnalysis, cfg: AnalysisConfig) -> dict[str, Any]:
    layers = []
    for layer, a in sorted(res.layers.items()):
        layers.append({
            "layer_id": layer, "records": a.records,
            "unique_blocks": a.unique_blocks.to_json(), "touched_block_ratio": a.touched_ratio.to_json(),
            "tokens_per_touched_block": a.tokens_per_block.to_json(),
            "overlap_prev_step": a.overlap_sum / a.pairs if a.pairs else None,
            "jaccard_prev_step": a.jaccard_sum / a.pairs if a.pairs else None,
            "jaccard_next_layer": a.adj_jaccard_sum / a.adj_pairs if a.adj_pairs else None,
        })
    out: dict[str, Any] = {
        "path": res.path, "records": res.records, "prefill_records": res.prefill_records, "requests": res.requests,
        "decode_tokens": res.decode_tokens,
        "has_block_ids": res.has_blocks, "per_layer": layers,
        "offsets": {**res.offsets.to_json(), "kind": "every selected token" if res.offsets_exact else
                    "per-record offset_p50 (no positions at this detail level)"},
        "kv_fetch_totals": res.kv_totals, "torn_lines_skipped": res.report.torn_lines,
    }
    if res.has_blocks:
        ws_mean = (res.ws_sum / np.maximum(res.ws_count, 1)).tolist()
        out["reuse_distance_steps"] = {**res.reuse.to_json(), "cold_accesses": res.cold_accesses}
        out["working_set_blocks"] = {"window_steps": cfg.window, "per_request_sum_over_layers": res.ws_sketch.to_json(),
                                     "mean_by_step": ws_mean}
        out["prefix_share_of_touched_blocks"] = (res.prefix_share_sum / res.prefix_share_n
                                                 if res.prefix_share_n else None)
        keys = np.concatenate(res.stream) if res.stream else np.zeros(0, np.int64)
        budgets = list(cfg.budgets) or default_budgets(res)
        wi = what_if(keys, budgets)
        misses = [(1 - h) * wi.accesses for h in wi.lru]
        tokens = max(1, res.stream_tokens)
        out["cache_what_if"] = {
            **wi.to_json(), "requests_replayed": res.stream_requests, "stream": "requests back to back, "
            "accesses of a step in layer order; key = (request, layer, logical block)",
            "lower_tier_bytes_per_decode_token_lru": [m * cfg.block_bytes / tokens for m in misses],
            "block_bytes": cfg.block_bytes,
        }
    return out
