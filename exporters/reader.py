"""Read what the JSONL exporter wrote, including runs that were killed mid-write.

``read_records(path)`` accepts a shard file, a run folder (``.../block64``), a rank folder, or the run root
(``<out>/<run>``), finds every shard (finalised, ``.partial`` or ``.late-N``, plain or ``.zst``) and yields one dict
per record in file order. An unterminated last line (a write cut short by a crash) is skipped and counted, never
returned half-parsed. ``recover_run`` makes a killed run tidy: trims torn tails and finalises ``.partial`` shards.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from typing import Iterator

import orjson

_SHARD_RE = re.compile(r"^trace_steps_(\d+)_(\d+)(\.late-\d+)?\.jsonl(\.zst)?(\.partial)?$")


@dataclass
class ReadReport:
    files: list[str] = field(default_factory=list)
    records: int = 0
    torn_lines: int = 0
    bad_lines: int = 0


def shard_files(path: str) -> list[str]:
    """Every shard under ``path`` (a file or any folder level of a run), sorted by first request id."""
    if os.path.isfile(path):
        return [path]
    found = []
    for p in glob.glob(os.path.join(path, "**", "trace_steps_*"), recursive=True):
        m = _SHARD_RE.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _raw_bytes(path: str) -> tuple[bytes, bool]:
    """File content (decompressed for .zst); the flag says a trailing compressed frame was incomplete."""
    with open(path, "rb") as f:
        data = f.read()
    if ".zst" not in os.path.basename(path):
        return data, False
    import zstandard

    out = bytearray()
    truncated = False
    while data:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        try:
            out += dobj.decompress(data)
        except zstandard.ZstdError:
            truncated = True
            break
        if not dobj.eof:
            truncated = True
            break
        data = dobj.unused_data
    return bytes(out), truncated


def iter_file(path: str, report: ReadReport | None = None) -> Iterator[dict]:
    data, truncated = _raw_bytes(path)
    if report is not None:
        report.files.append(path)
        report.torn_lines += int(truncated)
    end = data.rfind(b"\n")
    if end + 1 < len(data) and report is not None:
        report.torn_lines += 1  # bytes after the last newline: a write cut short
    for line in data[: end + 1].splitlines():
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            if report is not None:
                report.bad_lines += 1
            continue
        if report is not None:
            report.records += 1
        yield rec


def read_records(path: str, report: ReadReport | None = None) -> Iterator[dict]:
    """Every record under ``path`` (see module docstring). A single file that is not a shard is read as the
    OpenTelemetry Collector's ``file`` exporter output (OTLP JSON, one export request per line)."""
    if os.path.isfile(path) and not _SHARD_RE.match(os.path.basename(path)):
        yield from read_collector_file(path, report)
        return
    for f in shard_files(path):
        yield from iter_file(f, report)


def read_collector_file(path: str, report: ReadReport | None = None) -> Iterator[dict]:
    """Records from an OTLP-JSON file written by the Collector's ``file`` exporter, in the same form as the
    JSONL shards (spans of every run in the file, in file order; a torn last line is skipped)."""
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from dsa_otel import semconv as sc

    from .otlp_convert import request_spans
    from .records import payload_of, step_records

    data, _ = _raw_bytes(path)
    if report is not None:
        report.files.append(path)
    for line in data.splitlines():
        if not line.strip():
            continue
        req = ExportTraceServiceRequest()
        try:
            json_format.Parse(line.decode("utf-8"), req)
        except (json_format.ParseError, UnicodeDecodeError):
            if report is not None:
                report.torn_lines += 1
            continue
        for _, (name, attrs, trace_id) in request_spans(req):
            if name != sc.SPAN_DECODE_STEP:
                continue
            try:
                recs = step_records(attrs, trace_id, payload_of(attrs))
            except (ValueError, KeyError):
                if report is not None:
                    report.bad_lines += 1
                continue
            if report is not None:
                report.records += len(recs)
            for r in recs:  # same JSON types as a shard line
                yield orjson.loads(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY))


def recover_run(path: str) -> dict[str, int]:
    """Trim torn tails of ``.partial`` shards and finalise them (rename), so the run reads like a finished one.
    Returns counts of what was done. Finalised files are left untouched."""
    done = {"finalised": 0, "trimmed_bytes": 0}
    for f in shard_files(path):
        if not f.endswith(".partial"):
            continue
        if ".zst" not in os.path.basename(f):
            with open(f, "rb+") as fh:
                data = fh.read()
                keep = data.rfind(b"\n") + 1
                if keep < len(data):
                    fh.truncate(keep)
                    done["trimmed_bytes"] += len(data) - keep
        final = f[: -len(".partial")]
        if os.path.exists(final):
            stem, ext = final.split(".jsonl", 1)
            n = 1
            while os.path.exists(f"{stem}.late-{n}.jsonl{ext}"):
                n += 1
            final = f"{stem}.late-{n}.jsonl{ext}"
        os.replace(f, final)
        done["finalised"] += 1
    return done
