from hypothesis import given, strategies as st

from dsa_otel import request_id_from_trace_id, trace_id_for_request
from dsa_otel.ids import RequestTraceIdGenerator


@given(st.integers(min_value=0, max_value=2**64 - 1), st.text(min_size=1, max_size=20))
def test_integer_ids_round_trip_and_are_valid(rid, run):
    tid = trace_id_for_request(run, rid)
    assert 0 < tid < 2**128 and tid >> 64 != 0
    assert request_id_from_trace_id(tid) == rid
    assert trace_id_for_request(run, rid) == tid


def test_unique_within_a_run_and_distinct_across_runs():
    ids = {trace_id_for_request("a", i) for i in range(10000)}
    ids |= {trace_id_for_request("a", f"cmpl-{i}") for i in range(10000)}
    assert len(ids) == 20000
    assert trace_id_for_request("a", 5) != trace_id_for_request("b", 5)


def test_generator_uses_pinned_id_once():
    g = RequestTraceIdGenerator()
    g.pin_next_trace_id(1234)
    assert g.generate_trace_id() == 1234
    assert g.generate_trace_id() != 1234
