"""Tracing configuration: one frozen dataclass, validated once, overridable from the environment.

Why frozen: the tracer, the materializer thread and the exporters all read the configuration concurrently;
an immutable value needs no locking and cannot drift between them during a run.

Environment overrides (highest priority first):
  ``DSA_OTEL_<FIELD>``   e.g. ``DSA_OTEL_KV_BLOCK_SIZE=128``
  ``DS_TRACE_<FIELD>``   the seed's prefix, accepted as an alias, plus its historical names listed in
                         ``SEED_ALIASES`` (e.g. ``DS_TRACE_RECORD_BLOCK_IDS=1`` raises detail to ``blocks``).
OTLP settings also honour the standard ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`` / ``..._PROTOCOL`` variables
when the dsa-otel ones are not set.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

DetailLevel = Literal["summary", "blocks", "full"]
ExporterChoice = Literal["jsonl", "otlp", "both", "none"]
OtlpProtocol = Literal["grpc", "http/protobuf"]
Compression = Literal["none", "zstd"]
WorkerKind = Literal["thread", "process"]

DETAIL_LEVELS: tuple[str, ...] = ("summary", "blocks", "full")
EXPORTERS: tuple[str, ...] = ("jsonl", "otlp", "both", "none")
OTLP_PROTOCOLS: tuple[str, ...] = ("grpc", "http/protobuf")
COMPRESSIONS: tuple[str, ...] = ("none", "zstd")
WORKERS: tuple[str, ...] = ("thread", "process")

# Historical DS_TRACE_* names of the seed's trace.py that are not simply DS_TRACE_<FIELD>.
# Each maps to (field, value transform). Boolean switches become detail / store_scores.
SEED_ALIASES: dict[str, str] = {
    "DS_TRACE_ENABLE": "enabled",
    "DS_TRACE_DIR": "out_dir",
    "DS_TRACE_OUTPUT_DIR": "out_dir",
    "DS_TRACE_KV_BLOCK_SIZE_TOKENS": "kv_block_size",
    "DS_TRACE_RECORD_SCORES": "store_scores",
}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field or environment variable."""


@dataclass(frozen=True)
class TraceConfig:
    """Everything that decides what is traced and where it goes.

    Attributes:
        enabled: master switch; when False the tracer API is a set of no-ops.
        out_dir: root folder of runs; a run lives in ``<out_dir>/<run_name>/block<kv_block_size>/``.
        run_name: name of the run folder; also hashed into trace ids so runs never collide.
        dataset: free-form dataset name written to run_meta.json and the request spans.
        kv_block_size: tokens per KV block (logical block = pos // kv_block_size).
        detail: ``summary`` (statistics), ``blocks`` (+ touched block ids), ``full`` (+ every position).
        store_scores: also keep the indexer score of every selected token (only at ``full``, where positions
            are kept; at other levels score statistics {min, mean, max} are kept whenever scores are given).
        sample_rate: fraction of requests traced, decided per request (whole traces kept or dropped).
        max_requests_per_file: shard width; shard = request_id // max_requests_per_file (seed layout).
        exporters: where spans go: local sharded JSONL, OTLP, both, or none (metrics/summary only).
        otlp_endpoint / otlp_protocol / otlp_headers / otlp_insecure / otlp_compression: OTLP exporter settings;
            ``None`` means "use the standard OTEL_EXPORTER_OTLP_* variable or the exporter's default".
        payload_chunk_bytes: the base64 step payload is split into attributes of at most this many bytes
            (``dsa.step.payload.0``, ``.1``, ...) when larger, to stay under backends' attribute limits (Jaeger on
            Elasticsearch: 32766 bytes per keyword; Tempo truncates at its ``max_attribute_bytes``); 0 = never split.
        compression: ``zstd`` compresses shards (``.jsonl.zst``, one frame per batch, readable after a crash).
        ring_slots: capture slots in flight between the model thread and the materializer; when all are busy
            the step is dropped and counted rather than waiting. 0 (the default) picks 8 for a thread worker
            and 32 for worker processes (``capture_slots``).
        trace_prefill: also trace A during prefill: for every prefill chunk, the top-k of its last query (one
            ``phase="prefill"`` step per chunk, span ``dsa.prefill_chunk``); ``dsa-otel analyze`` keeps them apart
            from decode.
        worker: where statistics, span building and export run. ``thread``: a background thread of the traced
            process (no start-up cost; fine on the CPU). ``process``: a worker process (``python -m
            dsa_otel.worker``) fed through shared memory, so that tracing's Python work no longer competes with
            the model's kernel launches for the GIL (the GPU choice, see docs/performance.md). Spans from the
            worker carry the same trace ids; data already handed over survives a crash of the traced process.
            A ``kv_fetch_model`` is pickled into the worker, so its state evolves there, not in the caller's copy.
        worker_processes: with ``worker="process"``, how many worker processes share the work (1-7). Each owns
            the requests of every n-th shard (shard = request id // max_requests_per_file), so every shard file
            has one writer; summary.json is merged from all of them at shutdown (if the traced process dies
            first, each writes ``summary.worker<i>.json``). A ``kv_fetch_model`` is copied into each worker and
            sees only that worker's requests. One worker sustains 9-19 thousand records/s at ``blocks`` on an H100
            host, two about 25 thousand (docs/performance.md); add workers when steps drop and cores are free.
        shm_dir: where worker processes' capture slots live (files mapped by both processes). Default
            ``/dev/shm``; point it at a larger tmpfs when ``/dev/shm`` is small (docker's default is 64 MB, and a
            slot of 61 layers x 32 requests x top-2048 is 16 MB).
        max_queue_size / max_export_batch_size / schedule_delay_ms / export_timeout_ms: span processor bounds.
        kv_bytes_per_token: bytes of KV cache one token occupies in one layer (DeepSeek-V3.2: 656 = 512 FP8
            latent + 16 scale bytes + 64 bf16 RoPE dims); used by the default HBM fetch-cost model.
        hbm_bandwidth_gbps / hbm_op_latency_us: parameters of the default HBM fetch-cost model.
        rank / world_size: tensor-parallel position of this process; every rank writes its own shards.
        seed: salt of the sampling decision so a run's sample is reproducible.
    """

    enabled: bool = True
    out_dir: str = "outputs"
    run_name: str = "run"
    dataset: str = ""
    kv_block_size: int = 64
    detail: DetailLevel = "blocks"
    store_scores: bool = False
    sample_rate: float = 1.0
    max_requests_per_file: int = 4
    exporters: ExporterChoice = "jsonl"
    otlp_endpoint: str | None = None
    otlp_protocol: OtlpProtocol | None = None
    otlp_headers: str | None = None
    otlp_insecure: bool | None = None
    otlp_compression: str | None = None
    compression: Compression = "none"
    payload_chunk_bytes: int = 32000
    ring_slots: int = 0
    trace_prefill: bool = False
    worker: WorkerKind = "thread"
    worker_processes: int = 1
    shm_dir: str | None = None
    max_queue_size: int = 4096
    max_export_batch_size: int = 256
    schedule_delay_ms: int = 200
    export_timeout_ms: int = 30000
    kv_bytes_per_token: int = 656
    hbm_bandwidth_gbps: float = 3350.0
    hbm_op_latency_us: float = 1.0
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "TraceConfig":
        """Build a config: explicit ``overrides`` < ``DS_TRACE_*`` < ``DSA_OTEL_*``.

        Environment wins over code so that an operator can change a deployed job without editing it.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(overrides)
        values.update(_from_seed_env(env))
        for f in _env_fields():
            key = f"DSA_OTEL_{f.name.upper()}"
            if key in env:
                values[f.name] = _parse(f, env[key], key)
        values.update(_standard_otlp_env(env, values))
        return cls(**values)

    def replace(self, **changes: Any) -> "TraceConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived
    @property
    def run_dir(self) -> str:
        """Folder of this rank's files, seed layout: ``<out_dir>/<run_name>/block<kv_block_size>`` and,
        when ``world_size > 1``, a ``rank<r>`` folder below it so ranks never share a file."""
        base = os.path.join(self.out_dir, self.run_name, f"block{self.kv_block_size}")
        return base if self.world_size == 1 else os.path.join(base, f"rank{self.rank}")

    @property
    def capture_slots(self) -> int:
        """``ring_slots``, or with 0 the automatic depth: 8 for a thread worker (each step in flight holds its
        snapshot in device memory), 32 for worker processes (a step in flight holds only host shared memory,
        allocated as the backlog reaches it; the deeper ring rides out the workers' pauses, see
        docs/performance.md)."""
        if self.ring_slots:
            return self.ring_slots
        return AUTO_RING_SLOTS_PROCESS if self.worker == "process" else AUTO_RING_SLOTS_THREAD

    @property
    def wants_blocks(self) -> bool:
        return self.detail in ("blocks", "full")

    @property
    def wants_positions(self) -> bool:
        return self.detail == "full"

    def to_json(self) -> dict[str, Any]:
        """The values written to run_meta.json (no secrets: OTLP headers are redacted)."""
        d = dataclasses.asdict(self)
        if d.get("otlp_headers"):
            d["otlp_headers"] = "<redacted>"
        d["extra"] = dict(self.extra)
        return d


MAX_WORKER_PROCESSES = 7  # a slot's 64-byte header holds the step's token and one done word per worker
AUTO_RING_SLOTS_THREAD = 8
AUTO_RING_SLOTS_PROCESS = 32
MAX_RING_SLOTS = 1024


def _env_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TraceConfig) if f.name != "extra"]


_FIELD_TYPES: dict[str, type] = {
    "enabled": bool, "store_scores": bool, "otlp_insecure": bool, "trace_prefill": bool,
    "kv_block_size": int, "max_requests_per_file": int, "ring_slots": int, "max_queue_size": int,
    "worker_processes": int,
    "max_export_batch_size": int, "schedule_delay_ms": int, "export_timeout_ms": int,
    "kv_bytes_per_token": int, "payload_chunk_bytes": int, "rank": int, "world_size": int, "seed": int,
    "sample_rate": float, "hbm_bandwidth_gbps": float, "hbm_op_latency_us": float,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _parse(f: dataclasses.Field, raw: str, var: str) -> Any:
    kind = _FIELD_TYPES.get(f.name, str)
    text = raw.strip()
    if kind is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{var}={raw!r}: expected a boolean (1/0, true/false, yes/no, on/off)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{var}={raw!r}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{var}={raw!r}: expected a number") from None
    return text if text != "" or f.name not in ("otlp_endpoint", "otlp_protocol", "shm_dir") else None


def _from_seed_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by_name = {f.name: f for f in _env_fields()}
    for f in _env_fields():
        key = f"DS_TRACE_{f.name.upper()}"
        if key in env:
            out[f.name] = _parse(f, env[key], key)
    for key, name in SEED_ALIASES.items():
        if key in env and name not in out:
            out[name] = _parse(by_name[name], env[key], key)
    # The seed's opt-in switches for extra fields map onto detail levels.
    if "DS_TRACE_RECORD_BLOCK_IDS" in env:
        on = _parse(by_name["enabled"], env["DS_TRACE_RECORD_BLOCK_IDS"], "DS_TRACE_RECORD_BLOCK_IDS")
        if on and out.get("detail", "summary") == "summary":
            out["detail"] = "blocks"
    if "DS_TRACE_RECORD_TOKEN_POS" in env:
        on = _parse(by_name["enabled"], env["DS_TRACE_RECORD_TOKEN_POS"], "DS_TRACE_RECORD_TOKEN_POS")
        if on:
            out["detail"] = "full"
    return out


def _standard_otlp_env(env: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill OTLP fields left unset from the standard OpenTelemetry variables (traces-specific first)."""
    out: dict[str, Any] = {}
    pairs = {
        "otlp_endpoint": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        "otlp_protocol": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        "otlp_headers": ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        "otlp_compression": ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
    }
    for name, keys in pairs.items():
        if values.get(name) is not None:
            continue
        for key in keys:
            if env.get(key):
                out[name] = env[key].strip()
                break
    if values.get("otlp_insecure") is None:
        for key in ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"):
            if key in env:
                out["otlp_insecure"] = _parse(
                    next(f for f in _env_fields() if f.name == "otlp_insecure"), env[key], key)
                break
    return out


def _validate(c: TraceConfig) -> None:
    def need(cond: bool, name: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{name}={getattr(c, name)!r}: {msg} (env DSA_OTEL_{name.upper()})")

    for name, kind in _FIELD_TYPES.items():
        v = getattr(c, name)
        if v is None and name == "otlp_insecure":
            continue
        if kind is bool:
            need(isinstance(v, bool), name, "expected a boolean")
        elif kind is int:
            need(isinstance(v, int) and not isinstance(v, bool), name, "expected an integer")
        else:
            need(isinstance(v, (int, float)) and not isinstance(v, bool), name, "expected a number")
    need(c.kv_block_size > 0, "kv_block_size", "must be a positive number of tokens")
    need(c.detail in DETAIL_LEVELS, "detail", f"must be one of {', '.join(DETAIL_LEVELS)}")
    need(0.0 <= c.sample_rate <= 1.0, "sample_rate", "must be within [0, 1]")
    need(c.max_requests_per_file > 0, "max_requests_per_file", "must be >= 1")
    need(c.exporters in EXPORTERS, "exporters", f"must be one of {', '.join(EXPORTERS)}")
    need(c.otlp_protocol is None or c.otlp_protocol in OTLP_PROTOCOLS, "otlp_protocol",
         f"must be one of {', '.join(OTLP_PROTOCOLS)}")
    need(c.compression in COMPRESSIONS, "compression", f"must be one of {', '.join(COMPRESSIONS)}")
    need(0 <= c.ring_slots <= MAX_RING_SLOTS, "ring_slots", f"must be within [0, {MAX_RING_SLOTS}] (0: automatic)")
    need(c.worker in WORKERS, "worker", f"must be one of {', '.join(WORKERS)}")
    need(1 <= c.worker_processes <= MAX_WORKER_PROCESSES, "worker_processes",
         f"must be within [1, {MAX_WORKER_PROCESSES}]")
    need(c.worker_processes == 1 or c.worker == "process", "worker_processes",
         "more than one needs worker='process' (DSA_OTEL_WORKER=process)")
    need(c.shm_dir is None or (os.path.isdir(c.shm_dir) and os.access(c.shm_dir, os.W_OK)), "shm_dir",
         "must be an existing folder this process can write")
    need(c.max_queue_size >= 1, "max_queue_size", "must be >= 1")
    need(1 <= c.max_export_batch_size <= c.max_queue_size, "max_export_batch_size",
         "must be within [1, max_queue_size]")
    need(c.schedule_delay_ms >= 0, "schedule_delay_ms", "must be >= 0")
    need(c.export_timeout_ms > 0, "export_timeout_ms", "must be > 0")
    need(c.kv_bytes_per_token > 0, "kv_bytes_per_token", "must be > 0")
    need(c.payload_chunk_bytes == 0 or c.payload_chunk_bytes >= 256, "payload_chunk_bytes", "must be 0 or >= 256")
    need(c.hbm_bandwidth_gbps > 0, "hbm_bandwidth_gbps", "must be > 0")
    need(c.hbm_op_latency_us >= 0, "hbm_op_latency_us", "must be >= 0")
    need(c.world_size >= 1, "world_size", "must be >= 1")
    need(0 <= c.rank < c.world_size, "rank", "must be within [0, world_size)")
    need(bool(c.run_name) and os.sep not in c.run_name and c.run_name not in (".", ".."), "run_name",
         "must be a non-empty folder name")
