"""Protobuf wire encoding of the compact step payload (proto/dsa_trace.proto), vectorised with numpy.

Why hand-written instead of the generated classes: filling ``repeated`` fields from numpy arrays converts every
element to a Python int (about a million per decode step at B=8, 61 layers, top-k 2048), which is exactly the
per-element Python the hot path must avoid. Here varints are produced and parsed in a handful of numpy passes,
and the bytes are ordinary protobuf: ``dsa_trace_pb2.StepPayload.FromString`` parses them (tested), so any
language with the .proto can read the payload.

Decoding is defensive: malformed or hostile input raises ``PayloadError`` (never an IndexError or a huge
allocation), because the OTLP receiver decodes payloads that arrive from the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np

PAYLOAD_VERSION = 1
_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5
_MAX_ROWS = 1 << 20
_MAX_VALUES = 1 << 28

MATRIX_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f8"), 1: np.dtype("<f4"), 2: np.dtype("<i4"), 3: np.dtype("<i8"),
}
_DTYPE_CODES = {v: k for k, v in MATRIX_DTYPES.items()}


class PayloadError(ValueError):
    """A payload is not a valid dsa_otel.v1.StepPayload."""


# ---------------------------------------------------------------------------------------------- varints
def varint_encode(values: np.ndarray) -> bytes:
    """Base-128 varints of non-negative integers (numpy, no per-element Python)."""
    v = np.ascontiguousarray(values).astype(np.uint64, copy=False).ravel()
    if v.size == 0:
        return b""
    nbytes = np.ones(v.shape, dtype=np.int64)
    for k in range(1, 10):
        above = v >= np.uint64(1 << (7 * k))
        if not above.any():
            break
        nbytes += above
    offsets = np.cumsum(nbytes) - nbytes
    out = np.empty(int(nbytes.sum()), dtype=np.uint8)
    for k in range(int(nbytes.max())):
        if k == 0:
            sel_v, sel_n, sel_o = v, nbytes, offsets
        else:
            m = nbytes > k
            sel_v, sel_n, sel_o = v[m], nbytes[m], offsets[m]
        byte = ((sel_v >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        byte |= np.where(sel_n > k + 1, 0x80, 0).astype(np.uint8)
        out[sel_o + k] = byte
    return out.tobytes()


def varint_decode(buf: bytes | memoryview | np.ndarray) -> np.ndarray:
    """Parse a packed run of varints into uint64 values; raises PayloadError when truncated or overlong."""
    b = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    if b.size == 0:
        return np.zeros(0, dtype=np.uint64)
    term = b < 0x80
    if not term[-1]:
        raise PayloadError("truncated varint")
    ends = np.flatnonzero(term)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > 10:
        raise PayloadError("varint longer than 10 bytes")
    value_of_byte = np.repeat(np.arange(ends.size), lengths)
    shift = (np.arange(b.size) - starts[value_of_byte]) * 7
    parts = (b & 0x7F).astype(np.uint64) << shift.astype(np.uint64)
    return np.bitwise_or.reduceat(parts, starts)


def zigzag_encode(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.int64, copy=False)
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def zigzag_decode(values: np.ndarray) -> np.ndarray:
    u = values.astype(np.uint64, copy=False)
    return ((u >> np.uint64(1)).astype(np.int64)) ^ -((u & np.uint64(1)).astype(np.int64))


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(field_no: int, payload: bytes) -> bytes:
    return _uvarint((field_no << 3) | _WT_LEN) + _uvarint(len(payload)) + payload


def _varint_field(field_no: int, value: int) -> bytes:
    if value == 0:
        return b""  # proto3 default, omitted
    if value < 0:
        value &= (1 << 64) - 1
    return _uvarint(field_no << 3) + _uvarint(value)


# ---------------------------------------------------------------------------------------------- ragged rows
def row_starts(lengths: np.ndarray) -> np.ndarray:
    lengths = lengths.astype(np.int64, copy=False)
    return np.cumsum(lengths) - lengths


def delta_encode_rows(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Differences to the previous value within each row; each row's first value stays absolute."""
    v = values.astype(np.int64, copy=False)
    d = np.empty_like(v)
    if v.size:
        d[0] = v[0]
        d[1:] = v[1:] - v[:-1]
        starts = row_starts(lengths)
        starts = starts[lengths > 0]
        d[starts] = v[starts]
    return d


def delta_decode_rows(deltas: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    d = deltas.astype(np.int64, copy=False)
    if d.size == 0:
        return d
    c = np.cumsum(d)
    before = np.concatenate(([0], c))[row_starts(lengths)]
    return c - np.repeat(before, lengths)


def encode_ragged(values: np.ndarray, lengths: np.ndarray, zigzag: bool = False) -> bytes:
    """A RaggedInts message (without the enclosing field header)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    deltas = delta_encode_rows(np.asarray(values), lengths)
    if zigzag:
        packed = zigzag_encode(deltas)
    else:
        if deltas.size and int(deltas.min()) < 0:
            raise ValueError("rows must be sorted ascending and non-negative unless zigzag=True")
        packed = deltas
    return (_len_field(1, varint_encode(lengths)) + _len_field(2, varint_encode(packed))
            + (_varint_field(3, 1) if zigzag else b""))


@dataclass
class Ragged:
    """Decoded variable-length rows: ``values`` flat, row r is ``values[offsets[r]:offsets[r+1]]``."""

    values: np.ndarray
    lengths: np.ndarray

    @cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths))).astype(np.int64)

    def row(self, r: int) -> np.ndarray:
        o = self.offsets
        return self.values[o[r]:o[r + 1]]


# ---------------------------------------------------------------------------------------------- matrix
@lru_cache(maxsize=64)
def _matrix_header(columns: tuple[str, ...]) -> bytes:
    return b"".join(_len_field(1, c.encode("utf-8")) for c in columns)


def encode_matrix(columns: tuple[str, ...], data: np.ndarray) -> bytes:
    """A Matrix message: ``data`` is [rows, len(columns)] of float64/float32/int32/int64."""
    dt = np.dtype(data.dtype).newbyteorder("<")
    if dt not in _DTYPE_CODES:
        raise ValueError(f"unsupported matrix dtype {data.dtype}")
    if data.ndim != 2 or data.shape[1] != len(columns):
        raise ValueError(f"matrix shape {data.shape} does not match {len(columns)} columns")
    return (_matrix_header(columns) + _varint_field(2, data.shape[0]) + _varint_field(3, _DTYPE_CODES[dt])
            + _len_field(4, np.ascontiguousarray(data, dtype=dt).tobytes()))


# ---------------------------------------------------------------------------------------------- step payload
@dataclass
class StepPayload:
    """Decoded form of dsa_otel.v1.StepPayload."""

    layer_ids: np.ndarray
    columns: tuple[str, ...]
    stats: np.ndarray  # [n_layers, n_columns]
    positions: Ragged | None = None
    block_ids: Ragged | None = None
    physical_block_ids: Ragged | None = None
    scores: np.ndarray | None = None  # float16, aligned with positions.values
    offset_hist_mbits: int = 0
    offset_hist_buckets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    offset_hist_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    version: int = PAYLOAD_VERSION

    def column(self, name: str) -> np.ndarray:
        return self.stats[:, self.columns.index(name)]


def encode_step_payload(
    layer_ids: np.ndarray,
    columns: tuple[str, ...],
    stats: np.ndarray,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
    block_ids: tuple[np.ndarray, np.ndarray] | None = None,
    physical_block_ids: tuple[np.ndarray, np.ndarray] | None = None,
    scores_f16: np.ndarray | None = None,
    offset_hist: tuple[int, np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """Serialise one (request, step). Ragged arguments are (flat values, row lengths)."""
    parts = [_varint_field(1, PAYLOAD_VERSION),
             _len_field(2, varint_encode(np.asarray(layer_ids, dtype=np.int64).astype(np.uint64))),
             _len_field(3, encode_matrix(columns, stats))]
    if positions is not None:
        parts.append(_len_field(4, encode_ragged(*positions)))
    if block_ids is not None:
        parts.append(_len_field(5, encode_ragged(*block_ids)))
    if physical_block_ids is not None:
        parts.append(_len_field(6, encode_ragged(*physical_block_ids, zigzag=True)))
    if scores_f16 is not None:
        parts.append(_len_field(7, np.ascontiguousarray(scores_f16, dtype="<f2").tobytes()))
    if offset_hist is not None:
        mbits, buckets, counts = offset_hist
        parts.append(_len_field(8, _varint_field(1, mbits) + _len_field(2, varint_encode(buckets))
                                + _len_field(3, varint_encode(counts))))
    return b"".join(parts)


def _fields(buf: memoryview) -> list[tuple[int, int, object]]:
    """Top-level (field number, wire type, value) triples of a message; LEN values are memoryviews."""
    out: list[tuple[int, int, object]] = []
    i, n = 0, len(buf)
    while i < n:
        key, i = _read_uvarint(buf, i)
        field_no, wt = key >> 3, key & 7
        if field_no == 0:
            raise PayloadError("field number 0")
        if wt == _WT_VARINT:
            val, i = _read_uvarint(buf, i)
            out.append((field_no, wt, val))
        elif wt == _WT_LEN:
            ln, i = _read_uvarint(buf, i)
            if ln > n - i:
                raise PayloadError("length-delimited field runs past the end")
            out.append((field_no, wt, buf[i:i + ln]))
            i += ln
        elif wt == _WT_I64:
            if i + 8 > n:
                raise PayloadError("truncated fixed64")
            i += 8
        elif wt == _WT_I32:
            if i + 4 > n:
                raise PayloadError("truncated fixed32")
            i += 4
        else:
            raise PayloadError(f"unsupported wire type {wt}")
    return out


def _read_uvarint(buf: memoryview, i: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if i >= len(buf):
            raise PayloadError("truncated varint")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise PayloadError("varint longer than 10 bytes")


def _decode_ragged(buf: memoryview) -> Ragged:
    lengths = np.zeros(0, dtype=np.int64)
    deltas = np.zeros(0, dtype=np.uint64)
    zigzag = False
    for no, wt, val in _fields(buf):
        if no == 1 and wt == _WT_LEN:
            lengths = varint_decode(val).astype(np.int64)
        elif no == 2 and wt == _WT_LEN:
            deltas = varint_decode(val)
        elif no == 3 and wt == _WT_VARINT:
            zigzag = bool(val)
    if lengths.size > _MAX_ROWS or (lengths.size and (lengths.min() < 0 or lengths.max() > _MAX_VALUES)):
        raise PayloadError("ragged row lengths out of range")
    if int(lengths.sum()) != deltas.size:
        raise PayloadError(f"ragged rows hold {int(lengths.sum())} values but {deltas.size} were encoded")
    d = zigzag_decode(deltas) if zigzag else deltas.astype(np.int64)
    return Ragged(values=delta_decode_rows(d, lengths), lengths=lengths)


def _decode_matrix(buf: memoryview) -> tuple[tuple[str, ...], np.ndarray]:
    cols: list[str] = []
    rows, dtype_code, data = 0, 0, b""
    for no, wt, val in _fields(buf):
        if no == 1 and wt == _WT_LEN:
            try:
                cols.append(bytes(val).decode("utf-8"))
            except UnicodeDecodeError:
                raise PayloadError("column name is not UTF-8") from None
        elif no == 2 and wt == _WT_VARINT:
            rows = val
        elif no == 3 and wt == _WT_VARINT:
            dtype_code = val
        elif no == 4 and wt == _WT_LEN:
            data = val
    if dtype_code not in MATRIX_DTYPES:
        raise PayloadError(f"unknown matrix dtype {dtype_code}")
    dt = MATRIX_DTYPES[dtype_code]
    if rows > _MAX_ROWS or rows * len(cols) * dt.itemsize != len(data):
        raise PayloadError(f"matrix of {rows} x {len(cols)} {dt} does not match {len(data)} data bytes")
    arr = np.frombuffer(data, dtype=dt).reshape(rows, len(cols)) if cols else np.zeros((rows, 0), dt)
    return tuple(cols), arr


def decode_step_payload(data: bytes | memoryview) -> StepPayload:
    """Parse a StepPayload; raises PayloadError on malformed input."""
    buf = memoryview(bytes(data)) if not isinstance(data, memoryview) else data
    version = 0
    layer_ids = np.zeros(0, dtype=np.int64)
    columns: tuple[str, ...] = ()
    stats = np.zeros((0, 0))
    out_kwargs: dict[str, object] = {}
    for no, wt, val in _fields(buf):
        if no == 1 and wt == _WT_VARINT:
            version = val
        elif no == 2 and wt == _WT_LEN:
            layer_ids = varint_decode(val).astype(np.int64)  # int32 negatives are 10-byte two's complement
        elif no == 3 and wt == _WT_LEN:
            columns, stats = _decode_matrix(val)
        elif no == 4 and wt == _WT_LEN:
            out_kwargs["positions"] = _decode_ragged(val)
        elif no == 5 and wt == _WT_LEN:
            out_kwargs["block_ids"] = _decode_ragged(val)
        elif no == 6 and wt == _WT_LEN:
            out_kwargs["physical_block_ids"] = _decode_ragged(val)
        elif no == 7 and wt == _WT_LEN:
            if len(val) % 2:
                raise PayloadError("scores_f16 has an odd number of bytes")
            out_kwargs["scores"] = np.frombuffer(val, dtype="<f2")
        elif no == 8 and wt == _WT_LEN:
            for hno, hwt, hval in _fields(val):
                if hno == 1 and hwt == _WT_VARINT:
                    out_kwargs["offset_hist_mbits"] = int(hval)
                elif hno == 2 and hwt == _WT_LEN:
                    out_kwargs["offset_hist_buckets"] = varint_decode(hval).astype(np.int64)
                elif hno == 3 and hwt == _WT_LEN:
                    out_kwargs["offset_hist_counts"] = varint_decode(hval).astype(np.int64)
    if version != PAYLOAD_VERSION:
        raise PayloadError(f"unsupported payload version {version}")
    if stats.shape[0] != layer_ids.size:
        raise PayloadError(f"{layer_ids.size} layer ids but {stats.shape[0]} stats rows")
    for name in ("positions", "block_ids", "physical_block_ids"):
        rg = out_kwargs.get(name)
        if rg is not None and rg.lengths.size != layer_ids.size:  # type: ignore[union-attr]
            raise PayloadError(f"{name} has {rg.lengths.size} rows for {layer_ids.size} layers")  # type: ignore
    pos = out_kwargs.get("positions")
    sc = out_kwargs.get("scores")
    if sc is not None and (pos is None or sc.size != pos.values.size):  # type: ignore[union-attr]
        raise PayloadError("scores are not aligned with positions")
    if out_kwargs.get("offset_hist_buckets") is not None and out_kwargs.get("offset_hist_counts") is not None:
        if out_kwargs["offset_hist_buckets"].size != out_kwargs["offset_hist_counts"].size:  # type: ignore
            raise PayloadError("offset histogram buckets and counts differ in length")
    layer_ids = layer_ids.astype(np.uint64).view(np.int64)
    return StepPayload(layer_ids=layer_ids, columns=columns, stats=stats, version=version, **out_kwargs)  # type: ignore
