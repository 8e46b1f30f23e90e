"""Tensor parallelism (gloo, 2 CPU processes): TP=2 equals TP=1, and every rank traces its own shards."""

import os
import subprocess
import sys

import torch

from conftest import free_port
from dsa_otel.exporters import read_records

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")


def run_tp(world: int, out: str, ckpt: str | None = None) -> list[dict]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(port), out] + ([ckpt] if ckpt else []),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]


def test_tp2_equals_tp1_and_every_rank_traces(tmp_path):
    one = run_tp(1, str(tmp_path / "tp1"))[0]
    two = run_tp(2, str(tmp_path / "tp2"))
    for r in two:
        assert torch.allclose(r["logits"], one["logits"], atol=1e-4, rtol=1e-4)
        assert r["tokens"] == one["tokens"]  # same greedy generation
    base = tmp_path / "tp2" / "tp" / "block16"
    per_rank = {}
    for rank in (0, 1):
        d = base / f"rank{rank}"
        recs = list(read_records(str(d)))
        assert recs and all(rec["rank"] == rank for rec in recs)
        meta = (d / "run_meta.json").read_text()
        assert f'"rank": {rank}' in meta and '"world_size": 2' in meta
        per_rank[rank] = {(x["step_idx"], x["layer_id"]): x["selected_token_pos"] for x in recs}
    assert per_rank[0] == per_rank[1]  # the replicated indexer selects the same tokens on every rank
