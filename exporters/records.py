"""Expand a ``dsa.decode_step`` span into the seed's JSONL records: one per (request, step, layer).

Input is the span's attributes as a plain mapping, so the same code serves spans from the in-process SDK and
spans that arrive over OTLP (``dsa-otel receive``). Field names and nesting follow the seed (docs/schema.md); the
numbers come from the step payload, so the JSONL is identical whichever way the span travelled.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from dsa_otel import semconv as sc
from dsa_otel.kvfetch import TIER_FIELDS
from dsa_otel.wire import Ragged, StepPayload, decode_step_payload

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


@dataclass(frozen=True)
class _Layout:
    """Where each record field sits in a payload's stats matrix; one per distinct column tuple (cached)."""

    int_idx: list[int]           # INT_ORDER, then each tier's integer fields
    float_idx: list[int]         # FLOAT_ORDER (+ SCORE_ORDER), then each tier's other fields
    tiers: list[str]
    has_scores: bool


INT_ORDER = ("seq_len_current", "unique_token_pos_count", "offset_min", "offset_max", "unique_blocks",
             "total_blocks_in_use", "prefix_intersection_blocks")
FLOAT_ORDER = ("offset_p50", "touched_block_ratio", "tokens_per_touched_block.mean", "tokens_per_touched_block.p50",
               "tokens_per_touched_block.p95")
SCORE_ORDER = ("scores.min", "scores.mean", "scores.max")
_TIER_INT = tuple(f for f in TIER_FIELDS if f in INT_TIER_FIELDS)
_TIER_FLOAT = tuple(f for f in TIER_FIELDS if f not in INT_TIER_FIELDS)
# a record's kv_fetch.<tier> keys come in TIER_FIELDS order (the seed's): integer fields first, then the rest
assert _TIER_INT + _TIER_FLOAT == TIER_FIELDS, "step_records builds tier objects ints first"


@functools.lru_cache(maxsize=64)
def _layout(columns: tuple[str, ...]) -> _Layout:
    col = {c: i for i, c in enumerate(columns)}
    missing = [c for c in INT_ORDER + FLOAT_ORDER if c not in col]
    if missing:
        raise KeyError(f"step payload lacks columns {missing}")
    tiers = sorted({c.split(".")[1] for c in columns if c.startswith("kv_fetch.")})
    has_scores = all(c in col for c in SCORE_ORDER)
    return _Layout(
        int_idx=[col[c] for c in INT_ORDER] + [col[f"kv_fetch.{t}.{f}"] for t in tiers for f in _TIER_INT],
        float_idx=[col[c] for c in FLOAT_ORDER + (SCORE_ORDER if has_scores else ())]
        + [col[f"kv_fetch.{t}.{f}"] for t in tiers for f in _TIER_FLOAT],
        tiers=tiers, has_scores=has_scores)


def step_records(attrs: Mapping[str, Any], trace_id: int, payload: StepPayload | None = None) -> list[dict]:
    """The JSONL records of one decode-step span (numpy arrays inside; serialise with orjson's numpy option).

    Called once per (request, step) by the exporter: the stats matrix is converted to Python numbers in two
    ``tolist`` calls and the per-record work is building the dicts, nothing else."""
    p = payload if payload is not None else payload_of(attrs)
    n = p.layer_ids.size
    if n == 0:
        return []
    lay = _layout(tuple(p.columns))
    ints = p.stats[:, lay.int_idx].astype(np.int64).tolist()
    floats = p.stats[:, lay.float_idx].astype(np.float64).tolist()
    n_ti, n_tf = len(_TIER_INT), len(_TIER_FLOAT)
    i0, f0 = len(INT_ORDER), len(FLOAT_ORDER) + (len(SCORE_ORDER) if lay.has_scores else 0)  # tiers start here

    request_id = int(attrs[sc.REQUEST_ID])
    step_idx = int(attrs[sc.STEP_IDX])
    layer = p.layer_ids.tolist()
    batch_size = int(attrs.get(sc.BATCH_SIZE, 0))
    cached = int(attrs.get(sc.PREFIX_CACHED_BLOCKS, 0))
    prefix_hit = bool(attrs.get(sc.PREFIX_HIT, cached > 0))
    prefix_key = attrs.get(sc.PREFIX_KEY, "") or None
    tid = f"{trace_id:032x}"
    rank = int(attrs.get(sc.RANK, 0))
    phase = attrs.get(sc.PHASE, "decode")
    tiers = lay.tiers
    has_scores = lay.has_scores

    def cuts(r: Ragged | None) -> list[int] | None:
        return r.offsets.tolist() if r is not None else None

    pos_off, blk_off, phys_off = cuts(p.positions), cuts(p.block_ids), cuts(p.physical_block_ids)
    pos_v = p.positions.values if p.positions is not None else None
    blk_v = p.block_ids.values if p.block_ids is not None else None
    phys_v = p.physical_block_ids.values if p.physical_block_ids is not None else None
    scores = p.scores

    out: list[dict] = []
    for i in range(n):
        iv, f = ints[i], floats[i]
        seq, uniq_pos, omin, omax, ub, tb, inter = iv[:i0]
        rec: dict[str, Any] = {
            "request_id": request_id,
            "layer_id": layer[i],
            "step_idx": step_idx,
            "seq_len_current": seq,
            "unique_token_pos_count": uniq_pos,
            "offset_min": omin,
            "offset_p50": f[0],
            "offset_max": omax,
            "unique_blocks": ub,
            "total_blocks_in_use": tb,
            "touched_block_ratio": f[1],
            "tokens_per_touched_block": {"mean": f[2], "p50": f[3], "p95": f[4]},
        }
        if blk_off is not None:
            rec["selected_block_ids"] = blk_v[blk_off[i]:blk_off[i + 1]]  # type: ignore[index]
        if phys_off is not None:
            rec["physical_block_ids"] = phys_v[phys_off[i]:phys_off[i + 1]]  # type: ignore[index]
        kv: dict[str, dict] = {}
        for k, t in enumerate(tiers):
            d: dict[str, Any] = dict(zip(_TIER_INT, iv[i0 + k * n_ti:i0 + (k + 1) * n_ti]))
            d.update(zip(_TIER_FLOAT, f[f0 + k * n_tf:f0 + (k + 1) * n_tf]))
            d["batch_size"] = batch_size
            kv[t] = d
        rec["kv_fetch"] = kv
        rec["prefix"] = {
            "prefix_cache_hit": prefix_hit,
            "prefix_cached_blocks": cached,
            "prefix_key": prefix_key,
            "intersection_ratio": (inter / ub) if ub else 0.0,
            "intersection_blocks": inter,
        }
        if pos_off is not None:
            rec["selected_token_pos"] = pos_v[pos_off[i]:pos_off[i + 1]]  # type: ignore[index]
            if scores is not None:
                rec["scores_topk"] = scores[pos_off[i]:pos_off[i + 1]].astype(np.float32)
        if has_scores:
            rec["scores_stats"] = {"min": f[5], "mean": f[6], "max": f[7]}
        rec["trace_id"] = tid
        rec["rank"] = rank
        rec["phase"] = phase
        out.append(rec)
    return out
