"""bench/overhead.py runs on the CPU with the tiny model (the smoke test CI can run; figures come from the GPU)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overhead_bench_smoke_on_cpu(tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--preset", "tiny", "--device", "cpu",
         "--configs", "2x128", "--steps", "4", "--seed-steps", "3", "--repeats", "2", "--workers", "thread,process,process2",
         "--details", "blocks", "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    modes = report["configs"][0]["modes"]
    assert set(modes) == {"off", "dsa-otel/blocks/thread", "dsa-otel/blocks/process", "dsa-otel/blocks/process2",
                          "seed"}
    tiny_layers = report["n_layers"]
    for m in ("dsa-otel/blocks/thread", "dsa-otel/blocks/process", "dsa-otel/blocks/process2"):
        e = modes[m]
        assert e["drops"] == 0 and e["samples"] == 2 * (4 - 2)
        assert e["records_per_s"] > 0 and e["mb_per_s"] > 0
        assert e["model_thread_ms_per_step"] > 0
    assert modes["seed"]["records_per_s"] > 0
    assert modes["off"]["ratio_to_off"] == 1.0 and tiny_layers >= 2


def test_step_breakdown_smoke_on_cpu(tmp_path):
    """bench/step_breakdown.py runs on the CPU (eager tiny model) and reports every phase for every mode."""
    out = tmp_path / "breakdown.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "step_breakdown.py"), "--preset", "tiny", "--device", "cpu",
         "--configs", "2x128", "--steps", "4", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["configs"][0]
    assert (row["B"], row["context"]) == (2, 128)
    assert set(row["modes"]) == {"off", "traced", "record-only"}
    for m, e in row["modes"].items():
        assert e["step_ms"] > 0 and e["host_graph_ms"] > 0 and e["host_wait_ms"] >= 0
        assert e["step_ms"] >= e["host_graph_ms"]  # a phase of the step
    assert row["modes"]["off"]["ratio_to_off"] == 1.0


def test_engine_serve_bench_smoke_on_cpu(tmp_path):
    """bench/engine_serve.py serves the same requests untraced and traced (eager on the CPU) and reports both."""
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "engine_serve.py"), "--preset", "tiny", "--device", "cpu",
         "--no-graphs", "--requests", "3", "--batch", "2", "--prompt-len", "48", "--new-tokens", "4",
         "--repeats", "2", "--out", str(out)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    assert set(modes) == {"eager/off", "eager/blocks"}
    assert modes["eager/off"]["wall_ratio_to_off"] == 1.0 and modes["eager/off"]["steps_captured"] == 0
    traced = modes["eager/blocks"]
    assert traced["steps_captured"] > 0 and traced["steps_dropped"] == 0
    for e in modes.values():
        assert len(e["rounds"]) == 2 and all(r["tokens"] == 3 * 4 for r in e["rounds"]) and e["tpot_ms"] > 0
