"""``dsa-otel run`` and ``dsa-otel matrix``: trace a dataset on the reference engine, resumably.

A run: load the dataset (skips counted), drop prompts over ``--max-prompt-tokens`` (counted), keep
``--num-requests``; request ids are the position in that list, so they are the same on every run and resume. The
engine (prefix cache, tiered store, continuous batching, arrival replay for BurstGPT) serves them with a tracer
writing the seed's JSONL layout. The JSONL exporter appends a request to ``completed_requests.jsonl`` once all its
records are written; ``--resume`` skips those, removes the records of the others from the shards and runs them
again, so an interrupted and resumed run holds exactly the records of an uninterrupted one: the same
(request, step, layer) keys and the same model-determined content (selections, logical blocks, statistics). D,
physical block ids and C of re-run requests describe the resumed process's engine, whose prefix cache starts empty.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import orjson
import structlog

from dsa_otel.config import TraceConfig
from dsa_otel.exporters.jsonl import COMPLETED_LOG, atomic_write_json
from dsa_otel.exporters.reader import iter_file, recover_run, shard_files

from . import burstgpt, longbench, ruler, sharegpt
from .base import LoadReport, WorkloadRequest

log = structlog.get_logger("dsa_otel.runners")

DATASETS = ("ruler", "longbench-v2", "sharegpt", "burstgpt")


@dataclass
class RunOptions:
    dataset: str
    data: str
    out: str = "outputs"
    run_name: str | None = None
    num_requests: int = 8
    batch_size: int = 4
    max_new_tokens: int | None = None  # None: the dataset's logged output length (BurstGPT), else 16
    max_prompt_tokens: int = 0         # 0: the model's context limit
    kv_block_size: int | None = None
    detail: str = "blocks"
    exporter: str = "jsonl"
    model: str = "tiny"
    seed: int = 0
    resume: bool = False
    time_scale: float = 1.0
    length: str | None = None          # LongBench-v2 filter
    difficulty: str | None = None      # LongBench-v2 filter
    window: tuple[float | None, float | None] = (None, None)  # BurstGPT
    device: str = "cpu"
    cuda_graphs: bool = False  # decode steps replayed from CUDA graphs (device must be cuda)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def load_dataset(o: RunOptions, report: LoadReport) -> list[WorkloadRequest]:
    if o.dataset == "ruler":
        return ruler.load(o.data, report)
    if o.dataset == "longbench-v2":
        return longbench.load(o.data, report, length=o.length, difficulty=o.difficulty)
    if o.dataset == "sharegpt":
        return sharegpt.load(o.data, report)
    if o.dataset == "burstgpt":
        return burstgpt.load(o.data, report, start_s=o.window[0], end_s=o.window[1], time_scale=o.time_scale,
                             seed=o.seed)
    raise ValueError(f"unknown dataset {o.dataset!r}; choose one of {', '.join(DATASETS)}")


def build(o: RunOptions) -> tuple[Any, Any]:
    """(model, tokenizer) for ``--model tiny|small|CHECKPOINT_DIR`` (a converted checkpoint, see checkpoint.py)."""
    import torch

    from dsa_otel.model.checkpoint import load_converted
    from dsa_otel.model.config import ModelArgs, preset
    from dsa_otel.model.dsa import build_model
    from dsa_otel.model.generate import load_tokenizer

    dtype = torch.float32 if o.device == "cpu" else torch.bfloat16
    if os.path.isdir(o.model):
        args = ModelArgs.from_json(os.path.join(o.model, "config.json"))
        if o.kv_block_size:
            args = args.replace(kv_block_size=o.kv_block_size)
        model = build_model(args, o.device, dtype)
        load_converted(model, o.model)
        tok_path = os.path.join(o.model, "tokenizer.json")
        return model, load_tokenizer(tok_path if os.path.exists(tok_path) else None)
    args = preset(o.model, seed=o.seed)
    if o.kv_block_size:
        args = args.replace(kv_block_size=o.kv_block_size)
    torch.manual_seed(o.seed)
    return build_model(args, o.device, dtype), load_tokenizer(None)


def completed_ids(run_dir: str) -> set[int]:
    path = os.path.join(run_dir, COMPLETED_LOG)
    if not os.path.exists(path):
        return set()
    data = open(path, "rb").read()
    out = set()
    for line in data[: data.rfind(b"\n") + 1].splitlines():  # a torn last line is not a completion
        try:
            out.add(int(orjson.loads(line)["request_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def drop_incomplete(run_dir: str, done: set[int]) -> int:
    """Remove the records of requests not in ``done`` from every shard (atomically per file); returns how many."""
    recover_run(run_dir)
    removed = 0
    for f in shard_files(run_dir):
        keep, drop = [], 0
        for rec in iter_file(f):
            if int(rec["request_id"]) in done:
                keep.append(orjson.dumps(rec) + b"\n")
            else:
                drop += 1
        if drop:
            tmp = f + ".tmp"
            with open(tmp, "wb") as fh:
                fh.write(b"".join(keep))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, f)
            removed += drop
    return removed


def service_stats(done: list, wall_s: float) -> dict[str, Any]:
    """Per-request queue time, TTFT, TPOT, end-to-end latency (p50/p95/p99, seconds) and throughput."""
    out: dict[str, Any] = {"requests": len(done), "wall_s": wall_s}
    if not done:
        return out
    t = {k: np.array([r.timings()[k] for r in done]) for k in ("queue_s", "ttft_s", "tpot_s", "e2e_s")}
    for k, v in t.items():
        out[k] = {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
                  "p99": float(np.percentile(v, 99)), "mean": float(v.mean())}
    tokens = sum(len(r.output) for r in done)
    out["output_tokens"] = tokens
    out["throughput_tokens_per_s"] = tokens / wall_s if wall_s > 0 else 0.0
    out["throughput_requests_per_s"] = len(done) / wall_s if wall_s > 0 else 0.0
    return out


def run(o: RunOptions) -> dict[str, Any]:
    """Trace one dataset run; returns what it did (also merged into run_meta.json and summary.json)."""
    from dsa_otel.model.engine import Engine, Request
    from dsa_otel.tracer import DSATracer

    if o.cuda_graphs and not o.device.startswith("cuda"):
        raise ValueError(f"--cuda-graphs needs a CUDA device (got --device {o.device})")
    report = LoadReport(o.dataset)
    items = load_dataset(o, report)
    model, tok = build(o)
    margs = model.args
    limit = o.max_prompt_tokens if o.max_prompt_tokens > 0 else margs.max_seq_len - 1
    kept, too_long = [], 0
    for it in items:
        ids = tok.encode(it.prompt or "")
        if len(ids) > limit or len(ids) >= margs.max_seq_len:
            too_long += 1
            continue
        kept.append((it, ids))
        if len(kept) >= o.num_requests:
            break
    name = o.run_name or o.dataset
    cfg = TraceConfig.from_env(out_dir=o.out, run_name=name, dataset=o.dataset, kv_block_size=margs.kv_block_size,
                               detail=o.detail, exporters=o.exporter, ring_slots=512, seed=o.seed,  # type: ignore
                               extra={"completion_log": True, **o.extra})
    done_before: set[int] = set()
    removed = 0
    if o.resume and os.path.isdir(cfg.run_dir):
        done_before = completed_ids(cfg.run_dir)
        removed = drop_incomplete(cfg.run_dir, done_before)
    elif os.path.exists(os.path.join(cfg.run_dir, COMPLETED_LOG)):
        raise FileExistsError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, or another --out")
    todo = [(i, it, ids) for i, (it, ids) in enumerate(kept) if i not in done_before]
    reqs = []
    for i, it, ids in todo:
        budget = o.max_new_tokens if o.max_new_tokens is not None else (it.output_len or 16)
        reqs.append(Request(i, ids, max_new_tokens=budget, arrival_s=it.arrival_s if o.dataset == "burstgpt" else 0.0))
    workload = {"dataset": o.dataset, "data": o.data, "load": report.to_json(), "filtered_too_long": too_long,
                "max_prompt_tokens": limit, "requests": len(kept), "resumed_completed": len(done_before),
                "resume_removed_records": removed, "model": o.model, "options": _jsonable(asdict(o))}
    t0 = time.perf_counter()
    with DSATracer(cfg) as tracer:
        _merge_json(os.path.join(cfg.run_dir, "run_meta.json"), {"workload": workload})
        engine = Engine(model, num_blocks=_blocks_needed(reqs, margs), max_batch=o.batch_size, tracer=tracer,
                        eos_id=getattr(tok, "eos_id", None), device=o.device,
                        dtype=next(model.parameters()).dtype, cuda_graphs=o.cuda_graphs)
        bar = _progress(o, len(reqs), tracer)
        if bar is not None:
            produced = [0]

            def on_finish(req: Any) -> None:
                produced[0] += len(req.output)
                st = tracer.tracing_stats()
                bar.set_postfix(tok_s=f"{produced[0] / max(time.perf_counter() - t0, 1e-9):.0f}",
                                drops=st["steps_dropped"] + st["spans_dropped"], refresh=False)
                bar.update(1)
            engine.on_finish = on_finish
        done = engine.run(reqs)
        if bar is not None:
            bar.close()
    wall = time.perf_counter() - t0
    service = service_stats(done, wall)
    _merge_json(os.path.join(cfg.run_dir, "summary.json"), {"service": service, "workload": workload})
    return {"run_dir": cfg.run_dir, "requests_run": len(done), "workload": workload, "service": service}


def _blocks_needed(reqs: list, args: Any) -> int:
    per = [-(-(len(r.prompt) + max(r.max_new_tokens, 1) + 1) // args.kv_block_size) for r in reqs]
    return max(64, sum(sorted(per)[-8:]) * 2 + 16)


def _progress(o: RunOptions, total: int, tracer: Any) -> Any:
    if not o.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"dsa-otel {o.dataset}", unit="req", file=sys.stderr, leave=False)


def _merge_json(path: str, extra: dict[str, Any]) -> None:
    cur = json.load(open(path)) if os.path.exists(path) else {}
    cur.update(extra)
    atomic_write_json(path, cur)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def matrix(datasets: list[tuple[str, str]], sizes: list[int], gens: list[int], base: RunOptions,
           continue_on_error: bool = False) -> list[dict[str, Any]]:
    """Every dataset x DATA size x GEN length in its own run folder (the seed's run_all_traces)."""
    rows = []
    for ds, data in datasets:
        for n in sizes:
            for g in gens:
                name = f"{ds}_data{n}_gen{g}"
                o = replace(base, dataset=ds, data=data, num_requests=n, max_new_tokens=g, run_name=name)
                t0 = time.perf_counter()
                try:
                    res = run(o)
                    rows.append({"cell": name, "ok": True, "requests": res["requests_run"],
                                 "seconds": time.perf_counter() - t0, "run_dir": res["run_dir"]})
                except Exception as exc:  # noqa: BLE001 - reported per cell
                    rows.append({"cell": name, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                 "seconds": time.perf_counter() - t0})
                    log.error("matrix cell failed", cell=name, error=repr(exc))
                    if not continue_on_error:
                        raise
    return rows
