"""C: what fetching the touched KV blocks costs, per tier.

A ``KVFetchModel`` is consulted by the materializer (background thread, never the model thread) once per traced
step with every (request, layer) row of the step. It returns, per tier, per row: bytes read, read ops, blocks hit
and modelled latency. The serving engine plugs in its tiered store (HBM -> host DRAM -> remote pool); without
one, ``HBMOnlyFetchModel`` accounts everything as HBM reads, which is what a GPU-resident KV cache does.

Engines that measure fetches themselves (KV connectors, offload managers) report them with
``DSATracer.record_kv_fetch`` instead; explicit reports replace the model's numbers for that step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .wire import Ragged

TIER_FIELDS: tuple[str, ...] = ("bytes_read", "read_ops", "hit_blocks", "latency_us")


@dataclass
class FetchBatch:
    """Every (request, layer) row of one step, host-side.

    ``blocks`` holds each row's touched blocks in ascending logical order: physical ids when the engine gave a
    block table, logical ids otherwise (``physical`` says which). ``tokens`` is the number of selected tokens of
    the row, ``block_runs`` the number of maximal runs of consecutive block ids (one coalesced read each).
    """

    request_ids: Sequence[int | str]
    row_request: np.ndarray
    layer_ids: np.ndarray
    tokens: np.ndarray
    unique_blocks: np.ndarray
    block_runs: np.ndarray
    blocks: Ragged
    physical: bool
    block_size: int


@runtime_checkable
class KVFetchModel(Protocol):
    def account(self, batch: FetchBatch) -> dict[str, dict[str, np.ndarray]]:
        """Per tier name, per field of TIER_FIELDS, one value per row."""
        ...


class HBMOnlyFetchModel:
    """Everything resident in HBM: bytes = selected tokens x bytes per token; one read op per run of
    consecutive blocks; latency = ops x op_latency + bytes / bandwidth."""

    def __init__(self, kv_bytes_per_token: int = 656, bandwidth_gbps: float = 3350.0, op_latency_us: float = 1.0):
        self.kv_bytes_per_token = kv_bytes_per_token
        self.bytes_per_us = bandwidth_gbps * 1e3
        self.op_latency_us = op_latency_us

    def account(self, batch: FetchBatch) -> dict[str, dict[str, np.ndarray]]:
        bytes_read = batch.tokens.astype(np.float64) * self.kv_bytes_per_token
        ops = batch.block_runs.astype(np.float64)
        return {"hbm": {
            "bytes_read": bytes_read,
            "read_ops": ops,
            "hit_blocks": batch.unique_blocks.astype(np.float64),
            "latency_us": ops * self.op_latency_us + bytes_read / self.bytes_per_us,
        }}
