import base64
import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dsa_otel.wire import (PayloadError, decode_step_payload, delta_decode_rows, delta_encode_rows,
                           encode_step_payload, varint_decode, varint_encode)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@given(st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=200))
def test_varint_round_trip(values):
    arr = np.array(values, dtype=np.uint64)
    assert varint_decode(varint_encode(arr)).tolist() == values


def test_varint_matches_protobuf_encoding():
    from google.protobuf.internal import encoder

    for v in [0, 1, 127, 128, 300, 2**21, 2**35 + 7, 2**64 - 1]:
        parts = []
        encoder._VarintEncoder()(parts.append, v, True)
        assert varint_encode(np.array([v], dtype=np.uint64)) == b"".join(parts)


@given(st.lists(st.lists(st.integers(min_value=-10**9, max_value=10**9), max_size=30), max_size=8))
def test_delta_rows_round_trip(rows):
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    flat = np.array([x for r in rows for x in r], dtype=np.int64)
    assert delta_decode_rows(delta_encode_rows(flat, lengths), lengths).tolist() == flat.tolist()


def _sample_payload():
    rng = np.random.default_rng(0)
    rows = [np.sort(rng.choice(5000, 40, replace=False)) for _ in range(3)]
    lengths = np.array([r.size for r in rows])
    flat = np.concatenate(rows)
    blocks = [np.unique(r // 64) for r in rows]
    blens = np.array([b.size for b in blocks])
    phys = np.concatenate([rng.permutation(500)[: b.size] for b in blocks])
    stats = rng.standard_normal((3, 4))
    scores = rng.standard_normal(flat.size).astype(np.float16)
    data = encode_step_payload(np.array([0, 7, -1]), ("a", "b", "c", "d"), stats, positions=(flat, lengths),
                               block_ids=(np.concatenate(blocks), blens), physical_block_ids=(phys, blens),
                               scores_f16=scores, offset_hist=(4, np.array([0, 2040, 2100]), np.array([5, 1, 9])))
    return data, flat, lengths, blocks, phys, stats, scores


def test_payload_round_trip_and_generated_module_agrees():
    data, flat, lengths, blocks, phys, stats, scores = _sample_payload()
    p = decode_step_payload(data)
    assert p.layer_ids.tolist() == [0, 7, -1]
    assert p.columns == ("a", "b", "c", "d") and np.array_equal(p.stats, stats)
    assert np.array_equal(p.positions.values, flat) and np.array_equal(p.positions.lengths, lengths)
    assert np.array_equal(p.block_ids.values, np.concatenate(blocks))
    assert np.array_equal(p.physical_block_ids.values, phys)
    assert np.array_equal(p.scores, scores)
    assert p.offset_hist_buckets.tolist() == [0, 2040, 2100] and p.offset_hist_counts.tolist() == [5, 1, 9]
    sys.path.insert(0, os.path.join(ROOT, "proto"))
    try:
        import dsa_trace_pb2
    finally:
        sys.path.pop(0)
    msg = dsa_trace_pb2.StepPayload.FromString(data)
    assert list(msg.layer_ids) == [0, 7, -1]
    assert list(msg.stats.columns) == ["a", "b", "c", "d"] and msg.stats.rows == 3
    assert np.array_equal(np.frombuffer(msg.stats.data, "<f8").reshape(3, 4), stats)
    assert list(msg.positions.lengths) == lengths.tolist() and msg.physical_block_ids.zigzag
    assert list(msg.offsets.counts) == [5, 1, 9] and msg.offsets.mantissa_bits == 4
    # and the generated class's own serialisation decodes with ours
    assert np.array_equal(decode_step_payload(msg.SerializeToString()).positions.values, flat)


def test_payload_is_compact_vs_seed_json():
    import json

    data, flat, lengths, *_ = _sample_payload()
    rng = np.random.default_rng(1)
    pos = np.sort(rng.choice(131072, 2048, replace=False))
    one = encode_step_payload(np.array([0]), ("x",), np.zeros((1, 1)), positions=(pos, np.array([2048])))
    seed_json = len(json.dumps({"selected_token_pos": pos.tolist()}))
    assert len(base64.b64encode(one)) * 4 <= seed_json


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoder_never_crashes_on_garbage(blob):
    try:
        decode_step_payload(blob)
    except PayloadError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_decoder_rejects_mutations_cleanly(data):
    raw = bytearray(_sample_payload()[0])
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        decode_step_payload(bytes(raw[:cut]))
    except PayloadError:
        pass


def test_generated_module_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    shutil.copy(os.path.join(ROOT, "proto", "dsa_trace.proto"), tmp_path)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                    str(tmp_path / "dsa_trace.proto")], check=True)
    assert filecmp.cmp(tmp_path / "dsa_trace_pb2.py", os.path.join(ROOT, "proto", "dsa_trace_pb2.py"),
                       shallow=False), "proto/dsa_trace_pb2.py is stale: regenerate it (see proto/dsa_trace.proto)"
