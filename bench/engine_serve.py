"""The reference engine serving requests end to end: eager vs CUDA-graph decode, untraced vs traced, side by side.

Every mode serves the same requests (fresh prompts each round, identical across modes; no prefix sharing), in
rounds whose mode order rotates, on one engine and one tracer per mode kept for the whole run (graphs are
captured in an untimed warm-up round, a worker process starts once):

    eager/off, eager/<detail>    Engine(cuda_graphs=False), tracing off or at <detail> (process worker, JSONL)
    graphs/off, graphs/<detail>  Engine(cuda_graphs=True)

Reported per mode: wall time per round, generated tokens per second, TPOT (median over requests), and the ratio of
traced to untraced of the same decode kind. Prefill is eager in every mode.

    python bench/engine_serve.py --out bench/results/engine-serve-h100.json                  # GPU figures
    python bench/engine_serve.py --preset tiny --device cpu --no-graphs --requests 2 --prompt-len 64 \\
        --new-tokens 3 --repeats 1                                                          # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_model, write_report  # noqa: E402

from dsa_otel import DSATracer, TraceConfig  # noqa: E402
from dsa_otel.model.engine import Engine, Request  # noqa: E402


def requests_for(round_idx: int, n: int, prompt_len: int, new_tokens: int, vocab: int) -> list[Request]:
    """``n`` requests of random prompts, seeded by the round (every mode of a round serves the same ones); request
    ids are new every round (round -1 is the warm-up)."""
    rng = np.random.default_rng(1000 + round_idx)
    base = (round_idx + 1) * n
    return [Request(base + i, rng.integers(0, vocab, prompt_len).tolist(), max_new_tokens=new_tokens)
            for i in range(n)]


def serve(engine: Engine, reqs: list[Request], device: str) -> dict:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = engine.run(reqs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output) for r in done)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "tpot_ms": statistics.median(r.timings()["tpot_s"] for r in done) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="the engine's max_batch")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detail", default="blocks")
    ap.add_argument("--workers", type=int, default=1, help="worker processes of the traced modes")
    ap.add_argument("--no-graphs", action="store_true", help="eager modes only (CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args, model, dtype = bench_model(a.preset, a.device)
    kinds = ["eager"] + ([] if a.no_graphs else ["graphs"])
    modes = [f"{k}/{t}" for k in kinds for t in ("off", a.detail)]
    blocks = a.batch * (-(-(a.prompt_len + a.new_tokens + 1) // args.kv_block_size)) + 4
    out = tempfile.mkdtemp(prefix="dsa-engine-")
    tracers: dict[str, DSATracer | None] = {}
    engines: dict[str, Engine] = {}
    try:
        for m in modes:
            kind, trace = m.split("/")
            tracer = None
            if trace != "off":
                cfg = TraceConfig(out_dir=out, run_name=m.replace("/", "-"), detail=trace, worker="process",
                                  worker_processes=a.workers, kv_block_size=args.kv_block_size)
                tracer = DSATracer(cfg)
                tracer.flush(timeout_s=120)  # the worker is up before timing starts
            tracers[m] = tracer
            engines[m] = Engine(model, blocks, max_batch=a.batch, prefix_caching=False, tracer=tracer,
                                device=a.device, dtype=dtype, cuda_graphs=kind == "graphs")
            serve(engines[m], requests_for(-1, a.requests, a.prompt_len, a.new_tokens, args.vocab_size), a.device)
        rounds: dict[str, list[dict]] = {m: [] for m in modes}
        for r in range(a.repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                rounds[m].append(serve(engines[m], requests_for(r, a.requests, a.prompt_len, a.new_tokens,
                                                                args.vocab_size), a.device))
                if tracers[m] is not None:
                    tracers[m].flush(timeout_s=120)  # untimed: the next mode starts with an idle worker
        report: dict = {"gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                        "torch": torch.__version__, "preset": a.preset, "n_layers": args.n_layers,
                        "requests": a.requests, "batch": a.batch, "prompt_len": a.prompt_len,
                        "new_tokens": a.new_tokens, "repeats": a.repeats, "detail": a.detail, "workers": a.workers,
                        "modes": {}}
        for m in modes:
            runs = rounds[m]
            stats = tracers[m].tracing_stats() if tracers[m] is not None else {}
            report["modes"][m] = {
                "wall_s": statistics.median(x["wall_s"] for x in runs),
                "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                "tpot_ms": statistics.median(x["tpot_ms"] for x in runs),
                "graphs_captured": len(engines[m].graphs),
                "steps_captured": stats.get("steps_captured", 0), "steps_dropped": stats.get("steps_dropped", 0),
                "rounds": runs}
        for m in modes:
            kind, trace = m.split("/")
            e, off = report["modes"][m], report["modes"][f"{kind}/off"]
            e["wall_ratio_to_off"] = statistics.median(x["wall_s"] / y["wall_s"]
                                                       for x, y in zip(rounds[m], rounds[f"{kind}/off"]))
            e["tpot_ratio_to_off"] = e["tpot_ms"] / off["tpot_ms"]
            print(f"{m:16s} wall {e['wall_s']:7.2f} s  {e['tokens_per_s']:8.1f} tok/s  TPOT {e['tpot_ms']:7.2f} ms  "
                  f"wall x{e['wall_ratio_to_off']:.3f} TPOT x{e['tpot_ratio_to_off']:.3f}  graphs "
                  f"{e['graphs_captured']}  steps traced {e['steps_captured']} dropped {e['steps_dropped']}")
        write_report(a.out, report)
    finally:
        for t in tracers.values():
            if t is not None:
                t.shutdown(timeout_s=120)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
