"""BurstGPT: the request log CSV (``Timestamp, Model, Request tokens, Response tokens, Total tokens, Log Type``).
Each row becomes a synthetic prompt of the logged request length (deterministic filler text, one byte = one token
for the byte tokenizer), expects the logged response length, and arrives at its logged time (relative to the
window's start, divided by ``time_scale``).

Get the data: ``BurstGPT_1.csv`` (or later parts) from HPMLL/BurstGPT.
"""

from __future__ import annotations

import csv
import random

from .base import LoadReport, WorkloadRequest, require

HOW = "Download BurstGPT_1.csv from HPMLL/BurstGPT and pass it with --data."
COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")
_WORDS = "the a of to and in is it that for on with as was at by be this from or an are".split()


def synthetic_prompt(n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    words, size = [], 0
    while size < n_tokens:
        w = rng.choice(_WORDS) + " "
        words.append(w)
        size += len(w)
    return "".join(words)[:n_tokens]


def load(path: str, report: LoadReport | None = None, start_s: float | None = None, end_s: float | None = None,
         time_scale: float = 1.0, log_type: str | None = None, model: str | None = None,
         seed: int = 0) -> list[WorkloadRequest]:
    report = report or LoadReport("burstgpt")
    require(path, "BurstGPT", HOW)
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    out: list[WorkloadRequest] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS[:4] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a BurstGPT CSV (missing columns {missing})")
        for n, row in enumerate(reader, start=2):
            report.rows += 1
            where = f"{path}:{n}"
            try:
                ts = float(row["Timestamp"])
                req = int(float(row["Request tokens"]))
                resp = int(float(row["Response tokens"]))
            except (TypeError, ValueError):
                report.skip("non-numeric field", where)
                continue
            if req <= 0:
                report.skip("no request tokens", where)
                continue
            if resp <= 0:
                report.skip("no response tokens (failed request)", where)
                continue
            if (start_s is not None and ts < start_s) or (end_s is not None and ts >= end_s):
                report.skip("outside the time window", where)
                continue
            if log_type and row.get("Log Type") != log_type:
                report.skip(f"log type is not {log_type}", where)
                continue
            if model and row.get("Model") != model:
                report.skip(f"model is not {model}", where)
                continue
            out.append(WorkloadRequest(index=len(out), prompt=synthetic_prompt(req, seed * 1_000_003 + n),
                                       prompt_tokens=req, output_len=resp, arrival_s=ts,
                                       metadata={"timestamp": ts, "model": row.get("Model"),
                                                 "log_type": row.get("Log Type")}))
    out.sort(key=lambda r: r.arrival_s)
    t0 = out[0].arrival_s if out else 0.0
    for i, r in enumerate(out):  # arrivals relative to the window's first request, replayed time_scale x faster
        r.index = i
        r.arrival_s = (r.arrival_s - t0) / time_scale
    report.loaded = len(out)
    return out
