"""dsa-otel: OpenTelemetry tracing for DeepSeek Sparse Attention.

Public API (kept small and stable):
    TraceConfig      - what to trace and where (dataclass, env overrides DSA_OTEL_* / DS_TRACE_*)
    DSATracer        - record_topk / record_kv_fetch / record_prefix / start_request / end_step / end_request
    trace_id_for_request, request_id_from_trace_id - the deterministic request <-> trace mapping
    KVFetchModel, FetchBatch, HBMOnlyFetchModel   - plug a tiered KV store into C
"""

from .config import ConfigError, TraceConfig
from .ids import request_id_from_trace_id, trace_id_for_request
from .kvfetch import FetchBatch, HBMOnlyFetchModel, KVFetchModel
from .tracer import DSATracer

__version__ = "0.1.0"

__all__ = ["TraceConfig", "ConfigError", "DSATracer", "trace_id_for_request", "request_id_from_trace_id",
           "KVFetchModel", "FetchBatch", "HBMOnlyFetchModel", "__version__"]
