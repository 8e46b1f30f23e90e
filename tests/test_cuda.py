"""CUDA path: identical records to the CPU path, and no host synchronisation on the model thread.

Runs only where a GPU is present (the device machine; see bench/results/ for the recorded runs). CI has no GPU,
so these are not part of CI's coverage."""


import numpy as np
import pytest
import torch

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.exporters import read_records

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(out_dir, device, detail, sync_check=False, worker="thread"):
    cfg = TraceConfig(out_dir=out_dir, run_name=f"r-{device}-{worker}", detail=detail, store_scores=True,
                      ring_slots=64, kv_block_size=16, worker=worker)
    tracer = DSATracer(cfg)
    rng = np.random.default_rng(0)
    rids = [0, 1, 2]
    table = torch.from_numpy(rng.permutation(500)[:3 * 40].reshape(3, 40)).to(device)
    tracer.record_prefix(1, cached_blocks=2)
    for step in range(5):
        seq = torch.tensor([300 + step, 500 + step, 40], device=device)
        for layer in range(4):
            idx = torch.from_numpy(np.stack([rng.choice(600, 64, replace=False) for _ in range(3)])).to(device)
            idx[2, 50:] = -1
            scores = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32)).to(device)
            if sync_check:
                torch.cuda.set_sync_debug_mode("error")
            tracer.record_topk(layer, idx, seq, rids, scores=scores, block_table=table)
            if layer == 3:
                tracer.end_step()
            if sync_check:
                torch.cuda.set_sync_debug_mode("default")
    for r in rids:
        tracer.end_request(r)
    tracer.shutdown()
    return tracer, [{k: v for k, v in r.items() if k != "trace_id"} for r in read_records(cfg.run_dir)]


@pytest.mark.parametrize("worker", ["thread", "process"])
@pytest.mark.parametrize("detail", ["summary", "blocks", "full"])
def test_cuda_records_equal_cpu_records(tmp_path, detail, worker):
    _, cpu = _run(str(tmp_path), "cpu", detail)
    tr, gpu = _run(str(tmp_path), "cuda", detail, worker=worker)
    stats = tr.tracing_stats()
    assert stats["steps_failed"] == 0 and stats["steps_captured"] == 5
    key = lambda r: (r["request_id"], r["step_idx"], r["layer_id"])  # noqa: E731
    assert sorted(cpu, key=key) == sorted(gpu, key=key)


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_model_thread_never_synchronises(tmp_path, worker):
    tr, recs = _run(str(tmp_path), "cuda", "full", sync_check=True, worker=worker)
    stats = tr.tracing_stats()
    assert stats["steps_failed"] == 0 and stats["steps_captured"] == 5
    assert len(recs) == 5 * 4 * 3
