"""Peak memory and time of `dsa-otel analyze` as the number of records grows (target: 10^7 records < 1 GB RSS).

Writes seed-layout shards directly (blocks detail; drifting per-layer working sets, recency), then runs
`dsa-otel analyze` in a child process and reads its peak RSS.

    python bench/analyze_scale.py --records 1e5 1e6 1e7 --json bench/results/analyze-scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import orjson

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import dir_bytes, write_report  # noqa: E402


def write_run(root: str, n_records: int, layers: int = 8, steps: int = 500, K: int = 24, width: int = 4) -> str:
    run = os.path.join(root, "scale", "block64")
    os.makedirs(run, exist_ok=True)
    per_request = layers * steps
    n_requests = max(1, n_records // per_request)
    rng = np.random.default_rng(0)
    for shard in range(0, n_requests, width):
        lines = []
        for rid in range(shard, min(shard + width, n_requests)):
            base = rng.integers(0, 200, (layers, K))
            for s in range(steps):
                seq = 4096 + s
                drift = rng.integers(0, 64, (layers, K // 4))
                base[:, rng.integers(0, K, K // 4)] = drift  # a quarter of the blocks change per step
                for layer in range(layers):
                    blocks = np.unique(np.concatenate([base[layer], [seq // 64]]))
                    lines.append(orjson.dumps({
                        "request_id": rid, "layer_id": layer, "step_idx": seq - 1, "seq_len_current": seq,
                        "unique_token_pos_count": 2048, "offset_min": 0, "offset_p50": 900.0, "offset_max": seq - 1,
                        "unique_blocks": int(blocks.size), "total_blocks_in_use": seq // 64 + 1,
                        "touched_block_ratio": blocks.size / (seq // 64 + 1),
                        "tokens_per_touched_block": {"mean": 2048 / blocks.size, "p50": 30.0, "p95": 60.0},
                        "selected_block_ids": blocks,
                        "kv_fetch": {"hbm": {"bytes_read": 2048 * 656, "read_ops": 10, "hit_blocks": int(blocks.size),
                                             "latency_us": 12.0, "batch_size": 4}},
                        "prefix": {"prefix_cache_hit": False, "prefix_cached_blocks": 0, "prefix_key": None,
                                   "intersection_ratio": 0.0, "intersection_blocks": 0},
                        "rank": 0, "phase": "decode"}, option=orjson.OPT_SERIALIZE_NUMPY))
        a = shard
        with open(os.path.join(run, f"trace_steps_{a}_{a + width - 1}.jsonl"), "wb") as f:
            f.write(b"\n".join(lines) + b"\n")
    return os.path.join(root, "scale")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=float, nargs="+", default=[1e5, 1e6])
    ap.add_argument("--json", default=None)
    ap.add_argument("--dir", default=None, help="where to write the generated runs (default: a temp dir)")
    args = ap.parse_args()
    exe = os.path.join(os.path.dirname(sys.executable), "dsa-otel")
    results = []
    for n in args.records:
        root = tempfile.mkdtemp(prefix="dsa-scale-", dir=args.dir)
        try:
            t0 = time.time()
            run = write_run(root, int(n))
            gen_s = time.time() - t0
            size = dir_bytes(run)
            t0 = time.time()
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            res = subprocess.run([exe, "analyze", run, "--out", os.path.join(root, "an"), "--quiet"],
                                 capture_output=True, text=True)
            wall = time.time() - t0
            rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(res.returncode)
            a = json.load(open(os.path.join(root, "an", "analysis.json")))
            row = {"records": a["records"], "shard_bytes": size, "generate_s": gen_s, "analyze_s": wall,
                   "peak_rss_mb": rss_kb / 1024, "child_rss_monotone_note": before <= rss_kb,
                   "records_per_s": a["records"] / wall}
            results.append(row)
            print(f"{a['records']:>10d} records ({size / 1e9:.2f} GB of shards): analyze {wall:7.1f} s, "
                  f"peak RSS {rss_kb / 1024:7.1f} MB, {a['records'] / wall:8.0f} records/s", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    write_report(args.json, results)


if __name__ == "__main__":
    main()
