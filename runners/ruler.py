"""RULER: the official generated JSONL (``index``, ``input``, ``outputs``, ``length``), a folder of task files, or
the ``.tgz`` archive whose tasks use different schemas; plus a built-in needle-in-a-haystack generator so long
contexts can be traced with no data at all.

Get the data: generate it with NVIDIA/RULER's ``scripts/data/prepare.py`` (one ``validation.jsonl`` per task and
length), or download a prepared archive; pass the file, the folder or the .tgz with ``--data``.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from typing import Iterator

from .base import LoadReport, WorkloadRequest, require

HOW = ("Generate RULER with NVIDIA/RULER scripts/data/prepare.py, or pass a prepared .tgz / task folder; "
       "without data use --data synthetic:<tokens> for built-in needle-in-a-haystack prompts.")


def _prompt_of(row: dict) -> str | None:
    """The task schemas differ: 'input' (most), 'context' + 'query'/'question', or 'prompt'."""
    for key in ("input", "prompt"):
        if isinstance(row.get(key), str) and row[key]:
            return row[key]
    ctx = row.get("context")
    q = row.get("query", row.get("question"))
    if isinstance(ctx, str) and isinstance(q, str):
        return f"{ctx}\n\n{q}"
    return None


def _reference_of(row: dict) -> str | None:
    for key in ("outputs", "answers", "answer", "output"):
        v = row.get(key)
        if isinstance(v, list) and v:
            return ", ".join(map(str, v))
        if isinstance(v, str):
            return v
    return None


def _rows(path: str) -> Iterator[tuple[str, bytes]]:
    """(task name, raw line) of every JSONL line in a file, a folder or a .tgz archive."""
    if path.endswith((".tgz", ".tar.gz")):
        with tarfile.open(path, "r:gz") as tar:
            for m in sorted(tar.getmembers(), key=lambda m: m.name):
                if m.isfile() and m.name.endswith(".jsonl"):
                    task = os.path.basename(os.path.dirname(m.name)) or os.path.basename(m.name)[:-6]
                    for line in io.BytesIO(tar.extractfile(m).read()).read().splitlines():  # type: ignore[union-attr]
                        yield task, line
    elif os.path.isdir(path):
        for root, _, files in sorted(os.walk(path)):
            for f in sorted(files):
                if f.endswith(".jsonl"):
                    task = os.path.basename(root) if f == "validation.jsonl" else f[:-6]
                    with open(os.path.join(root, f), "rb") as fh:
                        for line in fh:
                            yield task, line
    else:
        with open(path, "rb") as fh:
            for line in fh:
                yield os.path.basename(path)[:-6], line


def load(path: str, report: LoadReport | None = None) -> list[WorkloadRequest]:
    report = report or LoadReport("ruler")
    if path.startswith("synthetic:"):
        n_tokens = int(path.split(":", 1)[1])
        return [needle_prompt(i, n_tokens) for i in range(64)]
    require(path, "RULER", HOW)
    out: list[WorkloadRequest] = []
    for n, (task, raw) in enumerate(_rows(path)):
        if not raw.strip():
            continue
        report.rows += 1
        where = f"{path}:{task}:{n}"
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            report.skip("not JSON", where)
            continue
        if not isinstance(row, dict):
            report.skip("not an object", where)
            continue
        prompt = _prompt_of(row)
        if prompt is None:
            report.skip("no input/prompt/context+query", where)
            continue
        out.append(WorkloadRequest(index=len(out), prompt=prompt, reference=_reference_of(row),
                                   metadata={"task": task, "ruler_index": row.get("index"),
                                             "length": row.get("length")}))
    report.loaded = len(out)
    return out


_HAY = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def needle_prompt(i: int, n_tokens: int, seed: int = 0) -> WorkloadRequest:
    """A RULER-style single needle in a noise haystack, ~n_tokens long (byte tokens), needle at a seeded depth."""
    rng = random.Random(seed * 1_000_003 + i)
    key, value = f"{rng.randrange(10**6):06d}", f"{rng.randrange(10**7):07d}"
    needle = f" One of the special magic numbers for {key} is: {value}. "
    question = f"\nWhat is the special magic number for {key} mentioned in the provided text? The number is:"
    budget = max(0, n_tokens - len(needle) - len(question) - 1)
    hay = (_HAY * (budget // len(_HAY) + 1))[:budget]
    depth = rng.randrange(len(hay) + 1)
    prompt = hay[:depth] + needle + hay[depth:] + question
    return WorkloadRequest(index=i, prompt=prompt, reference=value,
                           metadata={"task": "niah_synthetic", "depth": depth / max(1, len(hay)),
                                     "length": n_tokens})
