"""Expand a ``dsa.decode_step`` span into the seed's JSONL records: one per (request, step, layer).

Input is the span's attributes as a plain mapping, so the same code serves spans from the in-process SDK and
spans that arrive over OTLP (``dsa-otel receive``). Field names and nesting follow the seed (docs/schema.md); the
numbers come from the step payload, so the JSONL is identical whichever way the span travelled.
"""

from __future__ import annotations

import base64
from typing import Any, Mapping

import numpy as np

from dsa_otel import semconv as sc
from dsa_otel.kvfetch import TIER_FIELDS
from dsa_otel.wire import StepPayload, decode_step_payload

INT_COLUMNS = frozenset({
    "seq_len_current", "unique_token_pos_count", "offset_min", "offset_max", "unique_blocks",
    "total_blocks_in_use", "block_runs", "prefix_intersection_blocks", "physical_block_runs",
})
INT_TIER_FIELDS = frozenset({"bytes_read", "read_ops", "hit_blocks"})


MAX_PAYLOAD_CHUNKS = 4096


def payload_of(attrs: Mapping[str, Any]) -> StepPayload:
    """Decode a step span's payload (whole, or reassembled from its numbered chunks)."""
    raw = attrs.get(sc.PAYLOAD)
    if raw is None and sc.PAYLOAD_CHUNKS in attrs:
        n = attrs[sc.PAYLOAD_CHUNKS]
        if not isinstance(n, int) or not 0 < n <= MAX_PAYLOAD_CHUNKS:
            raise ValueError(f"bad {sc.PAYLOAD_CHUNKS}: {n!r}")
        parts = [attrs.get(f"{sc.PAYLOAD}.{i}") for i in range(n)]
        if not all(isinstance(p, str) for p in parts):
            raise ValueError("a payload chunk is missing (truncated by a backend?)")
        raw = "".join(parts)  # type: ignore[arg-type]
    if not isinstance(raw, str):
        raise ValueError(f"span has no {sc.PAYLOAD} attribute")
    try:
        data = base64.b64decode(raw, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"payload is not base64: {exc}") from None
    return decode_step_payload(data)


def step_records(attrs: Mapping[str, Any], trace_id: int, payload: StepPayload | None = None) -> list[dict]:
    """The JSONL records of one decode-step span (numpy arrays inside; serialise with orjson's numpy option)."""
    p = payload if payload is not None else payload_of(attrs)
    cols = p.columns
    n = p.layer_ids.size
    if n == 0:
        return []
    by_col = {c: p.stats[:, i] for i, c in enumerate(cols)}

    def ints(name: str) -> list[int]:
        return by_col[name].astype(np.int64).tolist()

    def floats(name: str) -> list[float]:
        return by_col[name].astype(np.float64).tolist()

    request_id = int(attrs[sc.REQUEST_ID])
    step_idx = int(attrs[sc.STEP_IDX])
    layer = p.layer_ids.tolist()
    seq = ints("seq_len_current")
    uniq_pos = ints("unique_token_pos_count")
    omin, op50, omax = ints("offset_min"), floats("offset_p50"), ints("offset_max")
    ub, tb, ratio = ints("unique_blocks"), ints("total_blocks_in_use"), floats("touched_block_ratio")
    tm, t50, t95 = (floats("tokens_per_touched_block.mean"), floats("tokens_per_touched_block.p50"),
                    floats("tokens_per_touched_block.p95"))
    inter = ints("prefix_intersection_blocks")
    tiers = sorted({c.split(".")[1] for c in cols if c.startswith("kv_fetch.")})
    tier_vals = {t: {f: (ints if f in INT_TIER_FIELDS else floats)(f"kv_fetch.{t}.{f}") for f in TIER_FIELDS}
                 for t in tiers}
    has_scores = "scores.min" in by_col
    if has_scores:
        smin, smean, smax = floats("scores.min"), floats("scores.mean"), floats("scores.max")
    batch_size = int(attrs.get(sc.BATCH_SIZE, 0))
    cached = int(attrs.get(sc.PREFIX_CACHED_BLOCKS, 0))
    prefix_hit = bool(attrs.get(sc.PREFIX_HIT, cached > 0))
    prefix_key = attrs.get(sc.PREFIX_KEY, "") or None
    tid = f"{trace_id:032x}"
    rank = int(attrs.get(sc.RANK, 0))
    phase = attrs.get(sc.PHASE, "decode")

    pos_off = p.positions.offsets if p.positions is not None else None
    blk_off = p.block_ids.offsets if p.block_ids is not None else None
    phys_off = p.physical_block_ids.offsets if p.physical_block_ids is not None else None

    out: list[dict] = []
    for i in range(n):
        rec: dict[str, Any] = {
            "request_id": request_id,
            "layer_id": layer[i],
            "step_idx": step_idx,
            "seq_len_current": seq[i],
            "unique_token_pos_count": uniq_pos[i],
            "offset_min": omin[i],
            "offset_p50": op50[i],
            "offset_max": omax[i],
            "unique_blocks": ub[i],
            "total_blocks_in_use": tb[i],
            "touched_block_ratio": ratio[i],
            "tokens_per_touched_block": {"mean": tm[i], "p50": t50[i], "p95": t95[i]},
        }
        if blk_off is not None:
            rec["selected_block_ids"] = p.block_ids.values[blk_off[i]:blk_off[i + 1]]  # type: ignore[union-attr]
        if phys_off is not None:
            rec["physical_block_ids"] = p.physical_block_ids.values[phys_off[i]:phys_off[i + 1]]  # type: ignore
        kv: dict[str, dict] = {}
        for t in tiers:
            d = {f: tier_vals[t][f][i] for f in TIER_FIELDS}
            d["batch_size"] = batch_size
            kv[t] = d
        rec["kv_fetch"] = kv
        rec["prefix"] = {
            "prefix_cache_hit": prefix_hit,
            "prefix_cached_blocks": cached,
            "prefix_key": prefix_key,
            "intersection_ratio": (inter[i] / ub[i]) if ub[i] else 0.0,
            "intersection_blocks": inter[i],
        }
        if pos_off is not None:
            rec["selected_token_pos"] = p.positions.values[pos_off[i]:pos_off[i + 1]]  # type: ignore[union-attr]
            if p.scores is not None:
                rec["scores_topk"] = p.scores[pos_off[i]:pos_off[i + 1]].astype(np.float32)
        if has_scores:
            rec["scores_stats"] = {"min": smin[i], "mean": smean[i], "max": smax[i]}
        rec["trace_id"] = tid
        rec["rank"] = rank
        rec["phase"] = phase
        out.append(rec)
    return out
