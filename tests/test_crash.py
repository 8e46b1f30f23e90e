"""A run killed with SIGKILL mid-write leaves whole lines and a readable run; a full disk loses only the batch."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import orjson
import pytest

from dsa_otel import TraceConfig
from dsa_otel.exporters import ShardedJsonlExporter, read_records, recover_run
from dsa_otel.exporters.reader import ReadReport

WRITER = textwrap.dedent("""
    import sys, torch
    from dsa_otel import DSATracer, TraceConfig
    cfg = TraceConfig(out_dir=sys.argv[1], run_name="killed", detail="full", max_requests_per_file=2,
                      schedule_delay_ms=1, max_export_batch_size=1, ring_slots=64, compression=sys.argv[2])
    tr = DSATracer(cfg)
    rid = 0
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:   # runs until killed (bounded, should the test die first)
        batch = [rid, rid + 1]
        for r in batch:
            tr.start_request(r, 4000)
        for step in range(3):
            for layer in range(8):
                tr.record_topk(layer, torch.randint(0, 4000, (2, 512)), torch.tensor([4000, 4000]), batch)
            tr.end_step()
        for r in batch:
            tr.end_request(r)
        rid += 2
        if rid == 8:
            print("ready", flush=True)
""")


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_sigkill_leaves_whole_lines_and_a_readable_run(tmp_path, compression):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), compression], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.7)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run = tmp_path / "killed"
    rep = ReadReport()
    recs = list(read_records(str(run), rep))
    assert len(recs) >= 8 * 3 * 8 and rep.bad_lines == 0
    for r in recs:
        assert len(set(r["selected_token_pos"])) == r["unique_token_pos_count"]
    per_req = {}
    for r in recs:
        per_req.setdefault(r["request_id"], set()).add(r["step_idx"])
    meta = json.loads((run / "block64" / "run_meta.json").read_text())
    assert meta["run_name"] == "killed"
    recover_run(str(run))
    files = os.listdir(run / "block64")
    assert not [f for f in files if f.endswith(".partial")]
    rep2 = ReadReport()
    again = list(read_records(str(run), rep2))
    assert rep2.bad_lines == 0 and len(again) == len(recs)
    if compression == "none":
        assert rep2.torn_lines == 0
        for f in files:
            if f.startswith("trace_steps_"):
                data = (run / "block64" / f).read_bytes()
                assert not data or data.endswith(b"\n")  # created-but-empty is a valid shard
                for line in data.splitlines():
                    orjson.loads(line)


def test_torn_tail_is_skipped_then_trimmed(tmp_path):
    d = tmp_path / "r" / "block64"
    d.mkdir(parents=True)
    good = orjson.dumps({"request_id": 0, "layer_id": 0}) + b"\n"
    (d / "trace_steps_0_3.jsonl.partial").write_bytes(good * 3 + b'{"request_id": 0, "lay')
    rep = ReadReport()
    assert len(list(read_records(str(tmp_path / "r"), rep))) == 3 and rep.torn_lines == 1
    done = recover_run(str(tmp_path / "r"))
    assert done == {"finalised": 1, "trimmed_bytes": len(b'{"request_id": 0, "lay')}
    assert (d / "trace_steps_0_3.jsonl").read_bytes() == good * 3


def test_full_disk_fails_the_batch_and_keeps_files_valid(tmp_path, monkeypatch):
    import torch

    from dsa_otel import DSATracer

    cfg = TraceConfig(out_dir=str(tmp_path), run_name="enospc", kv_block_size=16, ring_slots=64)
    jsonl = ShardedJsonlExporter(cfg)
    tracer = DSATracer(cfg, exporters=[jsonl])

    def step(rids):
        for layer in range(2):
            tracer.record_topk(layer, torch.randint(0, 100, (len(rids), 16)), torch.full((len(rids),), 100), rids)
        tracer.end_step()
        tracer.flush()

    step([0, 1])
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    step([0, 1])
    monkeypatch.setattr(os, "write", real_write)
    step([0, 1])
    tracer.shutdown()
    recs = list(read_records(str(tmp_path / "enospc")))
    assert len(recs) == 2 * 2 * 2  # first and third step; the failed batch is lost whole
    summary = json.loads((tmp_path / "enospc" / "block16" / "summary.json").read_text())
    assert summary["tracing"]["export_errors"] >= 1
