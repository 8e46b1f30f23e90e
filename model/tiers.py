"""C: a tiered KV store model — HBM -> host DRAM -> remote pool — that accounts every block the indexer touches.

The KV tensors stay where the model needs them; this model only decides, deterministically, where each
(layer, physical block) *would* live under a capacity per tier and a placement policy, and what fetching the touched
blocks costs. It is a ``dsa_otel.KVFetchModel``: the tracer calls ``account`` in its background thread with every
(request, layer) row of a step, in step order.

Per step and row, for each tier: ``hit_blocks`` (touched blocks found in that tier), ``bytes_read`` (HBM: the
selected tokens' KV bytes, a sparse read; lower tiers: whole blocks moved up), ``read_ops`` (runs of consecutive
block ids fetched together), ``latency_us`` = read_ops x op_latency + bytes / bandwidth.

Placement: a block seen for the first time is in HBM (it was just written there). A block touched in a lower tier
is promoted to HBM. When a tier is full, the policy's victim moves one tier down (the remote pool is unbounded).
Policies: ``lru`` (least recently touched), ``lfu`` (fewest touches, then least recent), ``indexer`` (keep what the
indexer touched within the last ``window`` steps; among the rest, least recent).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from dsa_otel.kvfetch import FetchBatch

TIERS = ("hbm", "dram", "remote")


@dataclass(frozen=True)
class TierSpec:
    name: str
    capacity_blocks: int | None  # None: unbounded
    bandwidth_gbps: float
    op_latency_us: float


DEFAULT_TIERS = (
    TierSpec("hbm", 4096, 3350.0, 1.0),
    TierSpec("dram", 65536, 50.0, 5.0),
    TierSpec("remote", None, 12.5, 50.0),
)


@dataclass
class _Tier:
    spec: TierSpec
    members: set = field(default_factory=set)
    heap: list = field(default_factory=list)  # (priority..., key) lazily invalidated


class TieredKVStore:
    """Deterministic tier accounting; see the module docstring."""

    def __init__(self, tiers: tuple[TierSpec, ...] = DEFAULT_TIERS, policy: str = "lru", block_size: int = 64,
                 kv_bytes_per_token: int = 656, window: int = 8) -> None:
        if policy not in ("lru", "lfu", "indexer"):
            raise ValueError("policy must be lru, lfu or indexer")
        if not tiers:
            raise ValueError("at least one tier is needed")
        for t in tiers[:-1]:
            if t.capacity_blocks is None or t.capacity_blocks < 1:
                raise ValueError(f"tier {t.name} needs a positive capacity (only the last tier may be unbounded)")
        self.tiers = [_Tier(t) for t in tiers]
        self.policy = policy
        self.block_bytes = block_size * kv_bytes_per_token
        self.kv_bytes_per_token = kv_bytes_per_token
        self.window = window
        self.where: dict[tuple[int, int], int] = {}      # key -> tier index
        self.last: dict[tuple[int, int], int] = {}       # key -> last touch (clock)
        self.count: dict[tuple[int, int], int] = {}      # key -> touches
        self.last_step: dict[tuple[int, int], int] = {}  # key -> step of last indexer touch
        self.clock = 0
        self.step = 0
        self.promotions = 0
        self.demotions = 0

    # ------------------------------------------------------------------ policy
    def _priority(self, key: tuple[int, int]) -> tuple:
        if self.policy == "lfu":
            return (self.count[key], self.last[key])
        if self.policy == "indexer":
            recent = self.step - self.last_step.get(key, -10**9) < self.window
            return (int(recent), self.last[key])
        return (self.last[key],)

    def _push(self, t: int, key: tuple[int, int]) -> None:
        heapq.heappush(self.tiers[t].heap, (self._priority(key), key))

    def _victim(self, t: int) -> tuple[int, int]:
        tier = self.tiers[t]
        while True:
            prio, key = heapq.heappop(tier.heap)
            if key in tier.members and prio == self._priority(key):
                return key

    def _insert(self, t: int, key: tuple[int, int]) -> None:
        """Place key in tier t, demoting victims down the hierarchy as needed."""
        tier = self.tiers[t]
        cap = tier.spec.capacity_blocks
        if cap is not None and len(tier.members) >= cap:
            victim = self._victim(t)
            tier.members.discard(victim)
            self.demotions += 1
            self._insert(t + 1, victim)
        tier.members.add(key)
        self.where[key] = t
        self._push(t, key)
        if len(tier.heap) > 4 * len(tier.members) + 64:  # drop stale heap entries
            tier.heap = [(self._priority(k), k) for k in tier.members]
            heapq.heapify(tier.heap)

    # ------------------------------------------------------------------ accounting
    def touch(self, layer: int, blocks: np.ndarray, tokens: int) -> dict[str, dict[str, float]]:
        """Fetch one row's touched blocks (ascending block order); returns per-tier stats of this row."""
        n_t = len(self.tiers)
        hits = [0] * n_t
        runs = [0] * n_t
        prev_block = [None] * n_t
        for b in blocks.tolist():
            key = (layer, b)
            self.clock += 1
            t = self.where.get(key)
            if t is None:
                self.count[key] = 0
            self.count[key] += 1
            self.last[key] = self.clock
            self.last_step[key] = self.step
            if t is None:  # first sight: the block was just written in HBM
                self._insert(0, key)
                t = 0
            elif t > 0:
                self.tiers[t].members.discard(key)
                self.promotions += 1
                self._insert(0, key)
            else:
                self._push(0, key)  # refreshed priority
            hits[t] += 1
            if prev_block[t] is None or b != prev_block[t] + 1:
                runs[t] += 1
            prev_block[t] = b
        out: dict[str, dict[str, float]] = {}
        for i, tier in enumerate(self.tiers):
            spec = tier.spec
            if i == 0:
                nbytes = float(tokens * self.kv_bytes_per_token)
                ops = runs[0]
            else:
                nbytes = float(hits[i] * self.block_bytes)
                ops = runs[i]
            out[spec.name] = {"bytes_read": nbytes, "read_ops": float(ops), "hit_blocks": float(hits[i]),
                              "latency_us": ops * spec.op_latency_us + nbytes / (spec.bandwidth_gbps * 1e3)}
        return out

    def account(self, batch: FetchBatch) -> dict[str, dict[str, np.ndarray]]:
        R = batch.row_request.size
        out = {t.spec.name: {f: np.zeros(R) for f in ("bytes_read", "read_ops", "hit_blocks", "latency_us")}
               for t in self.tiers}
        offsets, values = batch.blocks.offsets, batch.blocks.values
        for r in range(R):
            stats = self.touch(int(batch.layer_ids[r]), values[offsets[r]:offsets[r + 1]], int(batch.tokens[r]))
            for name, d in stats.items():
                for f, v in d.items():
                    out[name][f][r] = v
        self.step += 1
        return out

    def occupancy(self) -> dict[str, int]:
        return {t.spec.name: len(t.members) for t in self.tiers}
