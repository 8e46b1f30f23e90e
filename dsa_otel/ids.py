"""Deterministic request_id <-> trace id mapping.

A trace id is 128 bits: the high 64 bits are a hash of the run (run_name, rank-independent) and the low 64 bits
are the request id itself when it is a non-negative integer < 2**64, or a 64-bit BLAKE2b hash of it when it is a
string (serving engines such as vLLM use ids like ``"cmpl-3f2a-0"``). So:

* the same (run_name, request_id) always gives the same trace id, across processes, ranks and machines;
* two requests of one run never share a trace id (integer ids map one-to-one; string ids collide with
  probability ~n^2 / 2^65);
* an integer request id is read back from the trace id alone (``request_id_from_trace_id``), and every span also
  carries ``dsa.request_id`` (and ``dsa.request_key`` for string ids), so the mapping is reversible either way.

The high half is forced non-zero so the trace id is always valid, even for request 0.
"""

from __future__ import annotations

import hashlib
import threading

from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

_MASK64 = (1 << 64) - 1


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def run_trace_prefix(run_name: str) -> int:
    """The high 64 bits shared by every trace of a run (never zero)."""
    return _hash64("dsa-otel-run:" + run_name) or 1


def request_low_bits(request_id: int | str) -> int:
    if isinstance(request_id, bool):
        raise TypeError("request_id must be an int or a str, not bool")
    if isinstance(request_id, int):
        if not 0 <= request_id <= _MASK64:
            raise ValueError(f"integer request_id {request_id} is outside [0, 2**64)")
        return request_id
    if isinstance(request_id, str):
        return _hash64("dsa-otel-request:" + request_id)
    raise TypeError(f"request_id must be an int or a str, got {type(request_id).__name__}")


def trace_id_for_request(run_name: str, request_id: int | str) -> int:
    """The 128-bit trace id of a request in a run."""
    return (run_trace_prefix(run_name) << 64) | request_low_bits(request_id)


def request_id_from_trace_id(trace_id: int) -> int:
    """The integer request id (or the 64-bit hash of a string id) encoded in a trace id."""
    return trace_id & _MASK64


def format_trace_id(trace_id: int) -> str:
    return f"{trace_id:032x}"


class RequestTraceIdGenerator(IdGenerator):
    """An OTel ``IdGenerator`` whose next trace id can be pinned by the tracer before it starts a root span.

    Span ids stay random. When nothing is pinned it falls back to random trace ids, so spans that other code
    creates on the same provider keep working.
    """

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self._pinned = threading.local()

    def pin_next_trace_id(self, trace_id: int) -> None:
        self._pinned.value = trace_id

    def generate_span_id(self) -> int:
        return self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        value = getattr(self._pinned, "value", None)
        if value is None:
            return self._random.generate_trace_id()
        self._pinned.value = None
        return value
