"""The normalised request every loader produces, and the bookkeeping of rows that could not be used."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("dsa_otel.runners")


@dataclass
class WorkloadRequest:
    """One request of a workload, whatever the dataset.

    ``prompt`` is text (tokenised by the runner); ``prompt_tokens`` is a token count to synthesise when the dataset
    only logs lengths (BurstGPT). ``output_len`` is the expected/logged answer length in tokens, if known."""

    index: int
    prompt: str | None = None
    prompt_tokens: int | None = None
    reference: str | None = None
    output_len: int | None = None
    arrival_s: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)


class MissingDataError(FileNotFoundError):
    """The dataset file is not where the user said; the message says where to get it."""


@dataclass
class LoadReport:
    """Rows read, and rows skipped per reason (every skip is also logged once with its location)."""

    dataset: str
    rows: int = 0
    loaded: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        log.warning("row skipped", dataset=self.dataset, reason=reason, where=where)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "rows": self.rows, "loaded": self.loaded,
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values())}


def require(path: str, dataset: str, how: str) -> None:
    import os

    if not os.path.exists(path):
        raise MissingDataError(f"{dataset} data not found at {path!r}. {how}")


def load_json_list(path: str, dataset: str, what: str) -> list:
    """A dataset file that must be one JSON list; anything else is a clear error naming the file."""
    import json

    with open(path, "rb") as f:
        try:
            rows = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not {dataset} JSON: {exc}") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of {what}")
    return rows
