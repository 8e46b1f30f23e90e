"""dsa-otel: OpenTelemetry tracing for DeepSeek Sparse Attention.

Public API (kept small and stable):
    TraceConfig      - what to trace and where (dataclass, env overrides DSA_OTEL_* / DS_TRACE_*)
    DSATracer        - record_topk / record_kv_fetch / record_prefix / start_request / end_step / end_request
    trace_id_for_request, request_id_from_trace_id - the deterministic request <-> trace mapping
    KVFetchModel, FetchBatch, HBMOnlyFetchModel   - plug a tiered KV store into C
"""

import os as _os

# In a source checkout that is imported without being installed (``python -c`` from the repository root puts the
# checkout's ``dsa_otel/`` first on sys.path), the sibling folders model/, exporters/, runners/ and proto/ are the
# subpackages that setuptools' package-dir maps in an install; make them resolvable the same way.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "exporters", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

from .config import ConfigError, TraceConfig  # noqa: E402
from .ids import request_id_from_trace_id, trace_id_for_request  # noqa: E402
from .kvfetch import FetchBatch, HBMOnlyFetchModel, KVFetchModel  # noqa: E402
from .tracer import DSATracer  # noqa: E402

__version__ = "0.1.0"

__all__ = ["TraceConfig", "ConfigError", "DSATracer", "trace_id_for_request", "request_id_from_trace_id",
           "KVFetchModel", "FetchBatch", "HBMOnlyFetchModel", "__version__"]
