"""The ``dsa-otel`` command line.

    dsa-otel demo [--out DIR] ...     trace the tiny DSA model on bundled prompts (or --synthetic), report, analyze
    dsa-otel report RUN_DIR           print the report of a traced run (summary.json + a pass over the shards)
    dsa-otel recover RUN_DIR          make a killed run readable: trim torn tails, finalise .partial shards
    dsa-otel run DATASET [--data P]   trace RULER / LongBench-v2 / ShareGPT / BurstGPT on the engine (--resume)
    dsa-otel matrix ...               datasets x DATA sizes x GEN lengths, one folder per cell
    dsa-otel analyze RUN_DIR          locality, working sets, LRU/LFU/Belady what-if -> analysis.json, Parquet, HTML
    dsa-otel receive [--out DIR]      OTLP receiver (gRPC :4317, HTTP :4318 on 127.0.0.1) -> the same JSONL
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from .config import DETAIL_LEVELS, EXPORTERS, ConfigError, TraceConfig


def _demo_model(args: argparse.Namespace) -> tuple[TraceConfig, str]:
    """The tiny reference DSA model generating for the bundled sample prompts, traced."""
    import torch

    from .model.config import preset
    from .model.dsa import build_model
    from .model.engine import Engine, Request
    from .model.generate import ByteTokenizer
    from .model.tiers import TieredKVStore, TierSpec
    from .tracer import DSATracer

    block = args.kv_block_size if args.kv_block_size is not None else preset("tiny").kv_block_size
    cfg = TraceConfig.from_env(out_dir=args.out, run_name=args.run_name, dataset="sample_prompts",
                               kv_block_size=block, detail=args.detail, exporters=args.exporter, ring_slots=256)
    margs = preset("tiny", seed=args.seed, kv_block_size=cfg.kv_block_size)
    torch.manual_seed(args.seed)
    model = build_model(margs)
    tok = ByteTokenizer()
    path = os.path.join(os.path.dirname(os.path.abspath(__import__("dsa_otel.model", fromlist=["x"]).__file__)),
                        "data", "sample_prompts.jsonl")
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.num_requests]
    # a deliberately small HBM so that the tier model (C) shows traffic to DRAM and the remote pool
    store = TieredKVStore((TierSpec("hbm", 48, 3350.0, 1.0), TierSpec("dram", 96, 50.0, 5.0),
                           TierSpec("remote", None, 12.5, 50.0)), block_size=margs.kv_block_size)
    with DSATracer(cfg, kv_fetch_model=store) as tracer:
        engine = Engine(model, 1024, max_batch=args.batch_size, tracer=tracer, eos_id=None)
        done = engine.run([Request(i, tok.encode(p), max_new_tokens=args.steps) for i, p in enumerate(prompts)])
    hits = sum(1 for r in done if r.prefix_blocks)
    return cfg, f"{len(prompts)} sample prompts x {args.steps} new tokens on the tiny DSA model " \
                f"({margs.n_layers} layers, top-k {margs.index_topk}, {margs.kv_block_size}-token blocks; " \
                f"{hits} prefix-cache hits, tiers {store.occupancy()})"


def _demo(args: argparse.Namespace) -> int:
    if not args.synthetic:
        t0 = time.perf_counter()
        cfg, what = _demo_model(args)
        print(f"traced {what} in {time.perf_counter() - t0:.2f}s -> {cfg.run_dir}")
        return _report_and_analyze(args, cfg)
    import torch

    from .synthetic import SyntheticWorkload, topk_for_step
    from .tracer import DSATracer

    cfg = TraceConfig.from_env(out_dir=args.out, run_name=args.run_name, dataset="synthetic",
                               kv_block_size=64 if args.kv_block_size is None else args.kv_block_size,
                               detail=args.detail, exporters=args.exporter, ring_slots=256)
    w = SyntheticWorkload(n_requests=args.num_requests, batch_size=args.batch_size, prompt_len=args.prompt_len,
                          decode_steps=args.steps, n_layers=args.layers, topk=args.topk, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    with DSATracer(cfg) as tracer:
        ids = list(range(w.n_requests))
        for start in range(0, len(ids), w.batch_size):
            batch = ids[start:start + w.batch_size]
            prompts = rng.integers(w.prompt_len // 2, w.prompt_len + 1, size=len(batch))
            # requests after the first of a batch share a system prompt: a prefix-cache hit of 2 blocks
            n_blocks = int((prompts.max() + w.decode_steps) // cfg.kv_block_size + 1)
            table = torch.from_numpy(rng.permutation(len(batch) * n_blocks * 2)[: len(batch) * n_blocks]
                                     .reshape(len(batch), n_blocks))
            for b, rid in enumerate(batch):
                tracer.start_request(rid, int(prompts[b]))
                if b > 0:
                    tracer.record_prefix(rid, cached_blocks=2, physical_block_ids=table[0, :2].tolist(),
                                         prefix_key="system-prompt")
            for s in range(w.decode_steps):
                seq = torch.from_numpy(prompts + s)
                for layer in range(w.n_layers):
                    tracer.record_topk(layer, topk_for_step(w, seq, layer, s), seq, batch, block_table=table)
                tracer.end_step()
            for rid in batch:
                tracer.end_request(rid)
    elapsed = time.perf_counter() - t0
    print(f"traced {w.n_requests} requests x {w.decode_steps} steps x {w.n_layers} layers in {elapsed:.2f}s "
          f"-> {cfg.run_dir}")
    return _report_and_analyze(args, cfg)


def _report_and_analyze(args: argparse.Namespace, cfg: TraceConfig) -> int:
    rc = _report(cfg.run_dir)
    if rc or args.no_analyze or cfg.exporters not in ("jsonl", "both"):
        return rc
    an = argparse.Namespace(run_dir=os.path.join(cfg.out_dir, cfg.run_name), out=None, compare=None, window=16,
                            budgets=None, max_accesses=1_000_000, block_bytes=cfg.kv_block_size * cfg.kv_bytes_per_token,
                            heatmap_request=None, heatmap_layer=None, no_parquet=False, quiet=True)
    print()
    return _analyze(an)


def _report(run_dir: str) -> int:
    from .exporters.reader import ReadReport, read_records, shard_files

    summaries = []
    for root, _, files in os.walk(run_dir):
        if "summary.json" in files:
            with open(os.path.join(root, "summary.json")) as f:
                summaries.append((root, json.load(f)))
    if not summaries and not shard_files(run_dir):
        print(f"no dsa-otel run under {run_dir}", file=sys.stderr)
        return 2
    rep = ReadReport()
    per_layer: dict[int, list[float]] = {}
    reqs: set[int] = set()
    for rec in read_records(run_dir, rep):
        per_layer.setdefault(rec["layer_id"], []).append(rec["touched_block_ratio"])
        reqs.add(rec["request_id"])
    print(f"\n== dsa-otel report: {run_dir}")
    print(f"shards: {len(rep.files)}   records: {rep.records}   requests: {len(reqs)}   "
          f"torn lines skipped: {rep.torn_lines}")
    for root, s in summaries:
        print(f"\n-- {os.path.relpath(root, run_dir) if root != run_dir else '.'}: summary.json")
        print(f"{'distribution':28s} {'count':>9s} {'min':>9s} {'p50':>9s} {'p95':>9s} {'max':>9s} {'mean':>9s}")
        for name, d in s.get("distributions", {}).items():
            print(f"{name:28s} {d['count']:9d} {d['min']:9.3f} {d['p50']:9.3f} {d['p95']:9.3f} "
                  f"{d['max']:9.3f} {d['mean']:9.3f}")
        for tier, t in s.get("kv_fetch_totals", {}).items():
            print(f"kv_fetch[{tier}]: {t.get('bytes_read', 0) / 1e6:.2f} MB in {t.get('read_ops', 0):.0f} reads, "
                  f"{t.get('latency_us', 0) / 1e3:.2f} ms modelled")
        tr = s.get("tracing", {})
        print(f"tracing: steps captured {tr.get('steps_captured', 0)}, dropped {tr.get('steps_dropped', 0)}, "
              f"spans dropped {tr.get('spans_dropped', 0)}, export errors {tr.get('export_errors', 0)}")
        print(f"requests with a prefix-cache hit: {s.get('requests_with_prefix_hit', 0)}; "
              f"hot prefix blocks listed for {len(s.get('hot_prefix_blocks', {}))} requests")
    if per_layer:
        print("\nmean touched-block ratio per layer: " + "  ".join(
            f"L{k}={np.mean(v):.3f}" for k, v in sorted(per_layer.items())))
    return 0


def _recover(run_dir: str) -> int:
    from .exporters.reader import recover_run

    done = recover_run(run_dir)
    print(f"finalised {done['finalised']} shard(s), trimmed {done['trimmed_bytes']} torn byte(s) in {run_dir}")
    return 0


def _receive(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .exporters.receiver import Receiver

    token = args.token or os.environ.get("DSA_OTEL_RECEIVER_TOKEN")
    rec = Receiver(args.out, host=args.host, grpc_port=None if args.grpc_port < 0 else args.grpc_port,
                   http_port=None if args.http_port < 0 else args.http_port, token=token, tls_cert=args.tls_cert,
                   tls_key=args.tls_key, max_message_bytes=int(args.max_message_mb * 1024 * 1024),
                   max_requests_per_file=args.max_requests_per_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    rec.start()
    print(f"dsa-otel receive: OTLP/gRPC {args.host}:{rec.grpc_port}  OTLP/HTTP {args.host}:{rec.http_port}/v1/traces"
          f"  -> {args.out}  (Ctrl-C to stop)", flush=True)
    stop.wait()
    rec.stop()
    s = rec.sink.stats
    print(f"received {s.requests} requests, {s.spans} spans ({s.rejected_spans} rejected, {s.bad_requests} bad, "
          f"{s.unauthenticated} unauthenticated, {s.oversized} oversized) into {', '.join(s.runs) or 'no run'}")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analysis.report import ParquetRecordSink, write_outputs
    from .analysis.run import AnalysisConfig, analyze_run, summarize

    out = args.out or os.path.join(args.run_dir if os.path.isdir(args.run_dir) else os.path.dirname(args.run_dir),
                                   "analysis")
    os.makedirs(out, exist_ok=True)
    cfg = AnalysisConfig(window=args.window, budgets=tuple(args.budgets or ()), max_accesses=args.max_accesses,
                         block_bytes=args.block_bytes, heatmap_request=args.heatmap_request,
                         heatmap_layer=args.heatmap_layer, progress=not args.quiet)
    runs = []
    for i, path in enumerate([args.run_dir] + ([args.compare] if args.compare else [])):
        sink = None
        if i == 0 and not args.no_parquet:
            try:
                sink = ParquetRecordSink(os.path.join(out, "records.parquet"))
            except ImportError:
                print("pyarrow not installed: no Parquet tables (pip install 'dsa-otel[analysis]')", file=sys.stderr)
        try:
            res = analyze_run(path, cfg, sink)
        finally:
            if sink is not None:
                sink.close()
        runs.append((os.path.basename(os.path.normpath(path)) if i == 0 or os.path.basename(
            os.path.normpath(path)) != os.path.basename(os.path.normpath(args.run_dir)) else f"{path}",
            summarize(res, cfg), res))
    paths = write_outputs(out, runs)
    s = runs[0][1]
    print(f"analysed {s['records']} records of {s['requests']} requests -> {paths['html']}")
    if s.get("cache_what_if"):
        c = s["cache_what_if"]
        qs = ("0.9", "0.95", "0.99")
        print("LRU budget (blocks) for 90/95/99% hits: "
              + ", ".join(str(c["budget_for"]["lru"][q] or "unreachable") for q in qs)
              + f" of all accesses ({c['cold']} of {c['accesses']} are first touches); "
              + ", ".join(str(c["budget_for"]["lru_warm"][q]) for q in qs) + " of re-references")
    return 0


def _run_options(args: argparse.Namespace, dataset: str, data: str) -> Any:
    from .runners.driver import RunOptions

    return RunOptions(dataset=dataset, data=data, out=args.out, run_name=getattr(args, "run_name", None),
                      num_requests=args.num_requests, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                      kv_block_size=args.kv_block_size, detail=args.detail, exporter=args.exporter, model=args.model,
                      seed=args.seed, resume=getattr(args, "resume", False), time_scale=args.time_scale,
                      length=args.length, difficulty=args.difficulty, window=(args.window_start, args.window_end),
                      device=args.device, cuda_graphs=args.cuda_graphs, progress=not args.quiet)


def _run(args: argparse.Namespace) -> int:
    from .runners.base import MissingDataError
    from .runners.driver import run

    data = args.data or _default_data(args.dataset)
    try:
        res = run(_run_options(args, args.dataset, data))
    except (MissingDataError, FileExistsError, ValueError) as exc:
        print(f"dsa-otel run: {exc}", file=sys.stderr)
        return 2
    w, s = res["workload"], res["service"]
    print(f"{args.dataset}: {res['requests_run']} requests traced -> {res['run_dir']}  (loaded {w['load']['loaded']}, "
          f"skipped {w['load']['skipped_total']}, too long {w['filtered_too_long']}, "
          f"already complete {w['resumed_completed']})")
    if "e2e_s" in s:
        print(f"latency p50/p95/p99 (s): TTFT {s['ttft_s']['p50']:.3f}/{s['ttft_s']['p95']:.3f}/{s['ttft_s']['p99']:.3f}"
              f"  e2e {s['e2e_s']['p50']:.3f}/{s['e2e_s']['p95']:.3f}/{s['e2e_s']['p99']:.3f}"
              f"  throughput {s['throughput_tokens_per_s']:.1f} tok/s")
    return 0


def _default_data(dataset: str) -> str:
    """Bundled fixtures, so every dataset runs offline; pass --data for the real thing."""
    fix = os.path.join(os.path.dirname(os.path.abspath(__import__("dsa_otel.runners", fromlist=["x"]).__file__)),
                       "fixtures")
    return {"ruler": os.path.join(fix, "ruler_niah_single_1.jsonl"),
            "longbench-v2": os.path.join(fix, "longbench_v2_sample.json"),
            "sharegpt": os.path.join(fix, "sharegpt_sample.json"),
            "burstgpt": os.path.join(fix, "burstgpt_sample.csv")}[dataset]


def _matrix(args: argparse.Namespace) -> int:
    from .runners.driver import matrix

    cells = [(d, (dict(x.split("=", 1) for x in args.data).get(d) if args.data else None) or _default_data(d))
             for d in args.datasets.split(",")]
    base = _run_options(args, cells[0][0], cells[0][1])
    rows = matrix(cells, [int(x) for x in args.data_sizes.split(",")], [int(x) for x in args.gen_lengths.split(",")],
                  base, continue_on_error=args.continue_on_error)
    print(f"\n{'cell':36s} {'ok':>4s} {'requests':>9s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['cell']:36s} {'yes' if r['ok'] else 'NO':>4s} {r.get('requests', 0):9d} {r['seconds']:8.1f}"
              + ("" if r["ok"] else f"  {r['error']}"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "matrix_summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="outputs")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=None, help="<= 0: until EOS; default: logged length or 16")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="skip (and count) longer prompts; 0: context")
    p.add_argument("--kv-block-size", type=int, default=None)
    p.add_argument("--detail", choices=DETAIL_LEVELS, default="blocks")
    p.add_argument("--exporter", choices=EXPORTERS, default="jsonl")
    p.add_argument("--model", default="tiny", help="tiny | small | a converted checkpoint folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-scale", type=float, default=1.0, help="BurstGPT: replay arrivals this many times faster")
    p.add_argument("--length", default=None, help="LongBench-v2: short | medium | long")
    p.add_argument("--difficulty", default=None, help="LongBench-v2: easy | hard")
    p.add_argument("--window-start", type=float, default=None, help="BurstGPT: first timestamp (s)")
    p.add_argument("--window-end", type=float, default=None, help="BurstGPT: end timestamp (s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay decode steps from CUDA graphs, as vLLM and SGLang decode (needs --device cuda)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsa-otel", description="OpenTelemetry tracing for DeepSeek Sparse Attention")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="trace the tiny DSA model on bundled prompts (or --synthetic), report, analyze")
    d.add_argument("--synthetic", action="store_true", help="a synthetic top-k workload instead of the model")
    d.add_argument("--out", default="outputs")
    d.add_argument("--run-name", default="demo")
    d.add_argument("--num-requests", type=int, default=8)
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--prompt-len", type=int, default=2048)
    d.add_argument("--steps", type=int, default=24, help="new tokens (model) / decode steps (synthetic)")
    d.add_argument("--layers", type=int, default=8)
    d.add_argument("--topk", type=int, default=256)
    d.add_argument("--kv-block-size", type=int, default=None, help="tokens per KV block (model: 16, synthetic: 64)")
    d.add_argument("--detail", choices=DETAIL_LEVELS, default="blocks")
    d.add_argument("--exporter", choices=EXPORTERS, default="jsonl")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-analyze", action="store_true", help="skip the analysis report")
    r = sub.add_parser("report", help="print the report of a traced run")
    r.add_argument("run_dir")
    rc = sub.add_parser("recover", help="make a killed run readable (trim torn tails, finalise shards)")
    rc.add_argument("run_dir")
    ru = sub.add_parser("run", help="trace a dataset on the reference engine (RULER, LongBench-v2, ShareGPT, BurstGPT)")
    ru.add_argument("dataset", choices=("ruler", "longbench-v2", "sharegpt", "burstgpt"))
    ru.add_argument("--data", default=None, help="dataset file/folder (default: the bundled fixture); "
                    "ruler also takes synthetic:<tokens>")
    ru.add_argument("--run-name", default=None)
    ru.add_argument("--resume", action="store_true", help="continue an interrupted run in the same --out")
    _add_run_args(ru)
    mx = sub.add_parser("matrix", help="datasets x DATA sizes x GEN lengths, one run folder per cell")
    mx.add_argument("--datasets", default="ruler,sharegpt")
    mx.add_argument("--data", nargs="*", help="DATASET=PATH pairs (default: the bundled fixtures)")
    mx.add_argument("--data-sizes", default="2,4")
    mx.add_argument("--gen-lengths", default="4,8")
    mx.add_argument("--continue-on-error", action="store_true")
    _add_run_args(mx)
    an = sub.add_parser("analyze", help="locality metrics, cache what-if, Parquet tables and an HTML report")
    an.add_argument("run_dir", help="a run folder (any level) or a Collector OTLP-JSON file")
    an.add_argument("--out", default=None, help="default: <run_dir>/analysis")
    an.add_argument("--compare", default=None, help="a second run to put beside the first")
    an.add_argument("--window", type=int, default=16, help="working-set window (decode steps)")
    an.add_argument("--budgets", type=int, nargs="*", help="HBM budgets in blocks (default: a log grid)")
    an.add_argument("--max-accesses", type=int, default=1_000_000, help="cap of the replayed access stream")
    an.add_argument("--block-bytes", type=int, default=64 * 656, help="bytes of one KV block of one layer")
    an.add_argument("--heatmap-request", type=int, default=None)
    an.add_argument("--heatmap-layer", type=int, default=None)
    an.add_argument("--no-parquet", action="store_true")
    an.add_argument("--quiet", action="store_true")
    rv = sub.add_parser("receive", help="OTLP trace receiver (gRPC + HTTP) writing the same sharded JSONL")
    rv.add_argument("--out", default="outputs")
    rv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    rv.add_argument("--grpc-port", type=int, default=4317, help="-1 disables gRPC")
    rv.add_argument("--http-port", type=int, default=4318, help="-1 disables HTTP")
    rv.add_argument("--token", default=None, help="require 'authorization: Bearer TOKEN' (or DSA_OTEL_RECEIVER_TOKEN)")
    rv.add_argument("--tls-cert", default=None)
    rv.add_argument("--tls-key", default=None)
    rv.add_argument("--max-message-mb", type=float, default=64.0)
    rv.add_argument("--max-requests-per-file", type=int, default=4)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import structlog

    # the command's results go to stdout; diagnostics (structlog) to stderr
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "demo":
            return _demo(args)
        if args.cmd == "report":
            return _report(args.run_dir)
        if args.cmd == "recover":
            return _recover(args.run_dir)
        if args.cmd == "receive":
            return _receive(args)
        if args.cmd == "analyze":
            return _analyze(args)
        if args.cmd == "run":
            return _run(args)
        if args.cmd == "matrix":
            return _matrix(args)
    except ConfigError as exc:
        print(f"dsa-otel: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
