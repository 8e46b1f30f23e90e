"""worker="process": the statistics / spans / export pipeline in a separate process, fed through shared memory.

Checked with real processes, real shared-memory files and real shards: records identical to thread mode, drops
decided (and reported) by the traced process, a dead worker never blocks the traced program, and a killed traced
process still leaves valid shards behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from dsa_otel import ConfigError, DSATracer, TraceConfig
from dsa_otel.exporters import ShardedJsonlExporter, read_records, recover_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def drive(tracer: DSATracer, *, n=6, batch=3, steps=4, layers=3, K=48, seed=0, scores=True, prefix=True,
          ids=None) -> int:
    """An engine-like workload; returns the number of (request, step, layer) rows fed."""
    rng = np.random.default_rng(seed)
    ids = list(range(n)) if ids is None else list(ids)
    prompt = {r: int(rng.integers(20, 200)) for r in ids}
    tables = {r: rng.permutation(1000)[:16] for r in ids}
    rows = 0
    for r in ids:
        tracer.start_request(r, prompt[r])
        if prefix and r == ids[1]:
            tracer.record_prefix(r, cached_blocks=3, physical_block_ids=tables[r][:3].tolist())
    for s0 in range(0, n, batch):
        group = ids[s0:s0 + batch]
        for s in range(steps):
            seq = np.array([prompt[r] + s for r in group])
            bt = torch.from_numpy(np.stack([tables[r] for r in group]))
            for layer in range(layers):
                raw = np.stack([rng.choice(max(x, K), size=K, replace=False) for x in seq])
                raw[raw >= seq[:, None]] = -1
                sc = torch.from_numpy(rng.standard_normal(raw.shape).astype(np.float32)) if scores else None
                tracer.record_topk(layer, torch.from_numpy(raw), torch.from_numpy(seq), group, block_table=bt,
                                   scores=sc)
                rows += len(group)
            tracer.end_step()
        for r in group:
            tracer.end_request(r)
    return rows


def records(path: str) -> list[dict]:
    return sorted(read_records(path), key=lambda r: (r["request_id"], r["step_idx"], r["layer_id"]))


@pytest.mark.parametrize("detail", ["summary", "full"])
def test_process_worker_writes_the_records_of_thread_mode(tmp_path, detail):
    out = {}
    for worker in ("thread", "process"):
        cfg = TraceConfig(out_dir=str(tmp_path / worker), run_name="r", detail=detail, store_scores=True,
                          kv_block_size=16, worker=worker, ring_slots=64)
        tracer = DSATracer(cfg)
        fed = drive(tracer)
        assert tracer.flush(timeout_s=60)
        stats = tracer.tracing_stats()
        tracer.shutdown()
        assert stats["steps_captured"] == 8 and stats["steps_dropped"] == 0 and stats["rows_traced"] == fed
        out[worker] = records(str(tmp_path / worker / "r"))
        if worker == "process":
            assert stats["worker_pid"] != os.getpid()
            summary = json.load(open(tmp_path / worker / "r" / "block16" / "summary.json"))
            assert summary["tracing"]["steps_captured"] == 8
    assert len(out["process"]) == 72
    assert out["process"] == out["thread"]  # every field, trace ids included
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"dsa-otel-{os.getpid()}-")]


def test_process_worker_refuses_explicit_exporters(tmp_path):
    cfg = TraceConfig(out_dir=str(tmp_path), worker="process")
    with pytest.raises(ConfigError, match="worker='process'"):
        DSATracer(cfg, exporters=[ShardedJsonlExporter(cfg)])
    with pytest.raises(ConfigError, match="DSA_OTEL_WORKER"):
        TraceConfig.from_env({"DSA_OTEL_WORKER": "fiber"})
    assert TraceConfig.from_env({"DSA_OTEL_WORKER": "process"}).worker == "process"


def test_stalled_worker_makes_steps_drop_and_the_count_reaches_summary(tmp_path):
    """A worker that cannot keep up (here: stopped) fills the ring; further steps are dropped at once, and the
    drop count decided in the traced process is what summary.json reports."""
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="r", kv_block_size=16, worker="process", ring_slots=2)
    tracer = DSATracer(cfg)
    assert tracer.flush(timeout_s=60)  # the worker is up
    pid = tracer.tracing_stats()["worker_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        fed_steps = 0
        t0 = time.monotonic()
        kept = []
        for s in range(20):
            tracer.record_topk(0, torch.arange(32).view(1, 32), torch.tensor([100 + s]), [7])
            kept.append(tracer.end_step())
            fed_steps += 1
        assert time.monotonic() - t0 < 10  # never waits for the worker
    finally:
        os.kill(pid, signal.SIGCONT)
    tracer.end_request(7)
    tracer.shutdown(timeout_s=60)
    stats = tracer.tracing_stats()
    assert stats["steps_dropped"] == kept.count(False) >= 18 - cfg.ring_slots
    assert stats["steps_captured"] == kept.count(True)
    summary = json.load(open(tmp_path / "r" / "block16" / "summary.json"))
    assert summary["tracing"]["steps_dropped"] == stats["steps_dropped"]
    assert len(records(str(tmp_path / "r"))) == kept.count(True)


def test_ring_depth_defaults_to_8_for_a_thread_and_32_for_worker_processes():
    assert TraceConfig().capture_slots == 8
    assert TraceConfig(worker="process").capture_slots == 32
    assert TraceConfig(worker="process", ring_slots=5).capture_slots == 5
    assert TraceConfig.from_env({"DSA_OTEL_RING_SLOTS": "12"}).capture_slots == 12
    with pytest.raises(ConfigError, match="ring_slots"):
        TraceConfig(ring_slots=-1)


def test_a_full_shared_memory_drops_the_step_with_a_clear_error_and_tracing_goes_on(tmp_path, monkeypatch, capsys):
    """A slot that cannot be reserved (tmpfs full: posix_fallocate says ENOSPC) drops that step, counted and
    logged, instead of a SIGBUS when the step is written; once there is room again steps are recorded."""
    import errno

    import dsa_otel.worker as W

    cfg = TraceConfig(out_dir=str(tmp_path), run_name="r", kv_block_size=16, worker="process")
    tracer = DSATracer(cfg)
    assert tracer.flush(timeout_s=60)
    real = os.posix_fallocate
    full = {"on": True}

    def fallocate(fd, offset, size):
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, size)

    monkeypatch.setattr(W.os, "posix_fallocate", fallocate)
    for s in range(3):
        tracer.record_topk(0, torch.arange(32).view(1, 32), torch.tensor([100 + s]), [7])
        assert tracer.end_step()  # taken: the failure is in the hand-over, not a full ring
    tag = tracer.materializer._slots[0].tag
    assert not [f for f in os.listdir(W._shm_dir()) if f.startswith(f"dsa-otel-{tag}-")]  # nothing half-made
    full["on"] = False
    for s in range(3, 5):
        tracer.record_topk(0, torch.arange(32).view(1, 32), torch.tensor([100 + s]), [7])
        tracer.end_step()
    tracer.end_request(7)
    tracer.shutdown(timeout_s=60)
    stats = tracer.tracing_stats()
    assert stats["steps_failed"] == 3
    assert sorted(r["seq_len_current"] for r in records(str(tmp_path / "r"))) == [103, 104]
    err = capsys.readouterr()
    assert "cannot reserve" in err.out + err.err and "shm-size" in err.out + err.err


def test_capture_slots_live_in_shm_dir(tmp_path):
    """``shm_dir`` puts the slot files elsewhere than /dev/shm (a larger tmpfs): the steps go through them there."""
    slots = tmp_path / "slots"
    slots.mkdir()
    cfg = TraceConfig(out_dir=str(tmp_path / "out"), run_name="r", kv_block_size=16, worker="process",
                      shm_dir=str(slots))
    tracer = DSATracer(cfg)
    for s in range(3):
        tracer.record_topk(0, torch.arange(32).view(1, 32), torch.tensor([100 + s]), [7])
        tracer.end_step()
    assert [f for f in os.listdir(slots) if f.startswith("dsa-otel-")]  # the slots used so far are there
    tracer.end_request(7)
    tracer.shutdown(timeout_s=60)
    assert tracer.tracing_stats()["steps_captured"] == 3
    assert len(records(str(tmp_path / "out" / "r"))) == 3
    assert TraceConfig.from_env({"DSA_OTEL_SHM_DIR": str(slots)}).shm_dir == str(slots)
    with pytest.raises(ConfigError, match="shm_dir"):
        TraceConfig(shm_dir=str(tmp_path / "missing"))


def test_killed_worker_never_blocks_the_traced_program(tmp_path):
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="r", kv_block_size=16, worker="process", ring_slots=4)
    tracer = DSATracer(cfg)
    drive(tracer, n=3, steps=2)
    assert tracer.flush(timeout_s=60)
    os.kill(tracer.tracing_stats()["worker_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while tracer.tracing_stats()["worker_alive"] and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    for s in range(50):  # more steps than ring slots: none may wait for the dead worker
        tracer.record_topk(0, torch.arange(32).view(1, 32), torch.tensor([300 + s]), [9])
        tracer.end_step()
    tracer.end_request(9)
    assert not tracer.flush(timeout_s=5)
    tracer.shutdown(timeout_s=10)
    assert time.monotonic() - t0 < 30
    stats = tracer.tracing_stats()
    assert stats["worker_alive"] == 0
    assert stats["steps_failed"] + stats["steps_dropped"] == 50 and stats["steps_failed"] >= 1
    recover_run(str(tmp_path / "r"))  # the worker was killed before finalising: recover its shards
    recs = records(str(tmp_path / "r"))
    assert {(r["request_id"], r["layer_id"]) for r in recs} >= {(0, 0), (1, 2), (2, 1)}
    assert all(r["request_id"] != 9 for r in recs)


@pytest.mark.parametrize("n_workers", [1, 2])
def test_worker_finishes_the_shards_when_the_traced_process_is_killed(tmp_path, n_workers):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from test_worker_process import drive
        from dsa_otel import DSATracer, TraceConfig
        tracer = DSATracer(TraceConfig(out_dir={str(tmp_path)!r}, run_name="r", kv_block_size=16,
                                       worker="process", worker_processes={n_workers}, max_requests_per_file=1,
                                       ring_slots=64))
        drive(tracer)
        tracer.flush(timeout_s=60)
        print("PIDS", *tracer.tracing_stats()["worker_pids"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PIDS"))  # the workers log on stdout too
    worker_pids = [int(p) for p in line.split()[1:]]
    assert len(worker_pids) == n_workers
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = []
        for pid in worker_pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the workers did not finish after their traced process died")
    run = tmp_path / "r" / "block16"
    assert not [f for f in os.listdir(run) if f.endswith(".partial")]  # finalised by the workers themselves
    assert len(records(str(tmp_path / "r"))) == 72
    if n_workers == 1:
        assert os.path.exists(run / "summary.json")
    else:  # nobody is left to merge: each worker keeps its share of the summary
        parts = [json.load(open(run / f"summary.worker{i}.json")) for i in range(n_workers)]
        assert sum(p["records"] for p in parts) == 72 and all(p["records"] for p in parts)


def test_worker_reads_a_slot_only_once_its_token_has_landed(tmp_path):
    """The traced process sends a step's message before its DMAs finish; the worker waits for the step's token in
    the slot header (written after the data) and gives up, counting the step failed, if it never comes."""
    import mmap
    import threading

    from dsa_otel.worker import _wait_ready

    path = tmp_path / "slot"
    path.write_bytes(bytes(4096))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
    header = np.frombuffer(m, dtype=np.int64, count=1)
    assert not _wait_ready(m, 7, timeout_s=0.05)  # never written: a timeout, not a hang
    timer = threading.Timer(0.05, lambda: header.__setitem__(0, 7))
    timer.start()
    assert _wait_ready(m, 7, timeout_s=5)  # arrives while waiting
    timer.join()
    assert not _wait_ready(m, 8, timeout_s=0.01)  # a later step's token is a different number
    del header
    m.close()


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_one_call_for_all_layers_records_what_per_layer_calls_record(tmp_path, worker):
    """record_topk(range(L), [L, B, K]) (what a CUDA graph of the whole step hands over) gives the records of L
    per-layer calls; a layer count that does not match the tensor is refused."""
    rng = np.random.default_rng(3)
    L, B, K, steps = 3, 4, 32, 3
    seq0 = rng.integers(40, 300, size=B)
    table = torch.from_numpy(rng.permutation(500)[:B * 20].reshape(B, 20))
    sel = [[np.stack([rng.choice(s + t, size=K, replace=False) for s in seq0]) for _ in range(L)]
           for t in range(steps)]
    out = {}
    for how in ("per-layer", "stacked"):
        cfg = TraceConfig(out_dir=str(tmp_path / how), run_name="r", detail="full", kv_block_size=16, worker=worker,
                          ring_slots=8)
        tracer = DSATracer(cfg)
        rids = list(range(B))
        for t in range(steps):
            seq = torch.from_numpy(seq0 + t + 1)
            if how == "per-layer":
                for layer in range(L):
                    tracer.record_topk(layer, torch.from_numpy(sel[t][layer]), seq, rids, block_table=table)
            else:
                tracer.record_topk(range(L), torch.from_numpy(np.stack(sel[t])), seq, rids, block_table=table)
            assert tracer.end_step()
        with pytest.raises(ValueError, match=r"2 layer ids need topk_indices of shape \[2, B, K\]"):
            tracer.record_topk([0, 1], torch.zeros(3, B, K, dtype=torch.long), seq, rids)
        for r in rids:
            tracer.end_request(r)
        tracer.shutdown()
        out[how] = records(str(tmp_path / how / "r"))
    assert len(out["stacked"]) == L * B * steps
    assert {(r["request_id"], r["step_idx"], r["layer_id"]) for r in out["stacked"]} == \
        {(b, int(seq0[b]) + t, layer) for b in range(B) for t in range(steps) for layer in range(L)}
    assert out["stacked"] == out["per-layer"]


def test_outbox_never_blocks_and_keeps_the_order_when_the_reader_is_behind():
    """The traced process writes messages straight to the socket; when the worker is not reading, the rest queue
    (the caller returns at once), reach the reader in order once it reads, and past the limit the worker is
    declared lost instead of the queue growing."""
    import socket
    from multiprocessing.connection import Connection

    from dsa_otel.worker import _Outbox

    a, b = socket.socketpair()
    lost: list[str] = []
    box = _Outbox(a, lost.append, limit_bytes=8 << 20)
    blob = b"x" * 50_000
    t0 = time.monotonic()
    for i in range(100):  # ~5 MB: far more than the socket buffer holds
        assert box.send(("m", i, blob))
    assert time.monotonic() - t0 < 5 and not lost
    rx = Connection(b.detach())
    got = [rx.recv()[1] for _ in range(100)]
    assert got == list(range(100))
    # a reader that never reads: the queue stops at the limit and the worker is declared lost
    c, d = socket.socketpair()
    lost2: list[str] = []
    box2 = _Outbox(c, lost2.append, limit_bytes=1 << 20)
    results = [box2.send(("m", i, blob)) for i in range(60)]
    assert results.count(False) >= 1 and results[-1] is False
    assert len(lost2) == 1 and "stopped reading" in lost2[0]
    box.close()
    box._thread.join(5)
    assert not box._thread.is_alive()  # the sender thread ends with the outbox
    for s in (d, a, c):
        s.close()
    rx.close()
    box2._thread.join(5)
    assert not box2._thread.is_alive() and len(lost2) == 1  # its blocked send failed; lost is reported once


def test_process_steps_need_no_message_back(tmp_path):
    """The worker hands a slot back by writing the step's token into the slot's done word; the traced process
    collects it when it next ends a step. With two slots, steps paced slower than the worker keep flowing with
    no drop, and no 'done' message reaches the traced process."""
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="r", kv_block_size=16, worker="process", ring_slots=2)
    tracer = DSATracer(cfg)
    assert tracer.flush(timeout_s=60)
    mat = tracer.materializer
    seen: list[str] = []
    real = mat._slot_done
    mat._slot_done = lambda *a: (seen.append("done"), real(*a))
    kept = []
    for s in range(30):
        tracer.record_topk(0, torch.arange(32).view(1, 32), torch.tensor([100 + s]), [7])
        kept.append(tracer.end_step())
        deadline = time.monotonic() + 10
        while len(mat._in_flight) > 1 and time.monotonic() < deadline:  # the worker is quick; pace the steps
            time.sleep(0.005)
            mat.poll()
    tracer.end_request(7)
    tracer.shutdown(timeout_s=60)
    stats = tracer.tracing_stats()
    assert all(kept) and stats["steps_dropped"] == 0 and stats["steps_captured"] == 30
    assert seen == []
    assert len(records(str(tmp_path / "r"))) == 30


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("string_ids", [False, True])
def test_several_workers_write_the_records_and_summary_of_one(tmp_path, string_ids):
    """worker_processes=3: each worker owns every third shard; together they write the records a single pipeline
    writes (each shard file by one writer) and summary.json is the merge of their summaries."""
    ids = [f"req-{i}" for i in range(6)] if string_ids else None
    out, summaries, stats = {}, {}, {}
    for name, kw in (("thread", dict(worker="thread")), ("three", dict(worker="process", worker_processes=3))):
        cfg = TraceConfig(out_dir=str(tmp_path / name), run_name="r", detail="full", store_scores=True,
                          kv_block_size=16, max_requests_per_file=1, ring_slots=64, **kw)
        tracer = DSATracer(cfg)
        fed = drive(tracer, ids=ids)
        assert tracer.flush(timeout_s=60)
        tracer.shutdown(timeout_s=60)
        stats[name] = tracer.tracing_stats()
        assert stats[name]["rows_traced"] == fed and stats[name]["steps_captured"] == 8
        recs = list(read_records(str(tmp_path / name / "r")))
        if string_ids:  # the numbers given to string ids differ; the trace id (from the string) does not
            for r in recs:
                r.pop("request_id")
            recs.sort(key=lambda r: (r["trace_id"], r["step_idx"], r["layer_id"]))
        else:
            recs.sort(key=lambda r: (r["request_id"], r["step_idx"], r["layer_id"]))
        out[name] = recs
        summaries[name] = json.load(open(tmp_path / name / "r" / "block16" / "summary.json"))
    assert len(set(stats["three"]["worker_pids"])) == 3
    assert len(out["three"]) == 72 and out["three"] == out["thread"]
    files = sorted(os.listdir(tmp_path / "three" / "r" / "block16"))
    shards = [f for f in files if f.startswith("trace_steps_")]
    assert len(shards) == 6 and not [f for f in files if ".late-" in f or f.endswith(".partial")]
    if string_ids:  # hot prefix blocks are keyed by the request's number: compare what they hold
        hot = [sorted(map(str, summaries[n].pop("hot_prefix_blocks").values())) for n in ("three", "thread")]
        assert hot[0] == hot[1] and hot[0]
    a, b = _flat(summaries["three"]), _flat(summaries["thread"])
    keys = {k for k in b if not k.startswith("tracing.")}
    assert keys <= set(a)
    for k in keys:  # exact, but sums of floats may add up in another order
        assert (a[k] == pytest.approx(b[k], rel=1e-9)) if isinstance(b[k], float) else a[k] == b[k], k
    assert a["tracing.steps_captured"] == 8 and a["tracing.rows_traced"] == 72
    assert a["tracing.jsonl_lines_written"] == 72
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"dsa-otel-{os.getpid()}-")]


def test_one_dead_worker_of_three_loses_only_its_requests(tmp_path):
    """A worker killed mid-run: the traced program never waits for it, the other workers' requests are complete
    on disk, and the loss is counted."""
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="r", kv_block_size=16, worker="process", worker_processes=3,
                      max_requests_per_file=1, ring_slots=64)
    tracer = DSATracer(cfg)
    assert tracer.flush(timeout_s=60)
    victim = tracer.tracing_stats()["worker_pids"][1]  # owns requests 1, 4, 7, ...
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while tracer.tracing_stats()["worker_alive"] and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    rows = drive(tracer, n=6, steps=3)
    assert tracer.flush(timeout_s=30)
    tracer.shutdown(timeout_s=30)
    assert time.monotonic() - t0 < 30
    recs = records(str(tmp_path / "r"))
    assert {r["request_id"] for r in recs} == {0, 2, 3, 5}
    assert len(recs) == rows // 6 * 4
    stats = tracer.tracing_stats()
    assert stats["worker_alive"] == 0 and stats["steps_dropped"] == 0
    assert stats["steps_failed"] == 6  # every step had a request of the dead worker (1 or 4)


def test_a_slow_worker_still_reads_its_steps_after_a_fast_one_has_exited(tmp_path):
    """With several workers, the first to finish must not remove the shared-memory slots that a slower one has
    yet to read (only the traced process, which owns them, does)."""
    import threading

    cfg = TraceConfig(out_dir=str(tmp_path), run_name="r", kv_block_size=16, worker="process", worker_processes=2,
                      max_requests_per_file=1, ring_slots=64)
    tracer = DSATracer(cfg)
    assert tracer.flush(timeout_s=60)
    fast, slow = tracer.tracing_stats()["worker_pids"]
    os.kill(slow, signal.SIGSTOP)
    try:
        rows = drive(tracer, n=4, batch=2, steps=3)  # the slow worker has mapped none of these slots yet
        stopper = threading.Thread(target=tracer.shutdown, kwargs={"timeout_s": 60})
        stopper.start()
        deadline = time.monotonic() + 30
        while tracer.materializer._links[0].process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tracer.materializer._links[0].process.poll() == 0  # the fast one is done and gone
    finally:
        os.kill(slow, signal.SIGCONT)
    stopper.join(60)
    stats = tracer.tracing_stats()
    assert stats["steps_failed"] == 0
    assert len(records(str(tmp_path / "r"))) == rows


def test_several_workers_keep_records_that_cover_part_of_their_request_list(tmp_path):
    """A record may hold fewer rows than its request list (the first positions); each worker still takes exactly
    its own rows of it."""
    out = {}
    for name, kw in (("thread", dict(worker="thread")), ("two", dict(worker="process", worker_processes=2))):
        cfg = TraceConfig(out_dir=str(tmp_path / name), run_name="r", detail="blocks", kv_block_size=16,
                          max_requests_per_file=1, ring_slots=8, **kw)
        tracer = DSATracer(cfg)
        rids = [0, 1, 2, 3]
        seq = torch.tensor([100, 120, 140, 160])
        for layer in range(2):  # layer 0 covers all four requests, layer 1 only the first three
            n = 4 - layer
            topk = torch.stack([torch.arange(8) * (r + 1) for r in range(n)])
            tracer.record_topk(layer, topk, seq, rids)
        assert tracer.end_step()
        for r in rids:
            tracer.end_request(r)
        tracer.shutdown(timeout_s=60)
        out[name] = records(str(tmp_path / name / "r"))
    assert [(r["request_id"], r["layer_id"]) for r in out["two"]] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0),
                                                                      (2, 1), (3, 0)]
    assert out["two"] == out["thread"]
