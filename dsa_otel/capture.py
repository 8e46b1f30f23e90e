"""Model-thread side of tracing: collect a step's top-k tensors and snapshot them with one device copy.

``record_topk`` only appends references to a list (O(1) Python, no device work); one call may carry one layer
([B, K]) or all layers of a step ([L, B, K], e.g. a CUDA graph's static buffer). ``end_step`` concatenates the
step's selections with one ``torch.cat`` on the producer's current stream (so later in-place writes by the model
cannot race it) into a reused int32 buffer; on a GPU the groups' per-request vectors (seq_lens, block tables)
join the same buffer, so one copy later moves the whole step to the host. It records a CUDA event and hands the
snapshot on. No sync, no ``.tolist()``, nothing proportional to K or to the number of tokens runs on this thread.

Contract: tensors passed to ``record_topk`` must not be modified in place before ``end_step`` of that step
(every engine we hook produces fresh top-k tensors per layer; a caller that reuses one buffer for all layers must
pass a copy).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch


@dataclass
class BatchGroup:
    """Records of one step that share a request list (normally all layers of a step share one)."""

    request_ids: Sequence[int | str]
    seq_lens: torch.Tensor | np.ndarray
    block_table: torch.Tensor | None
    steps: torch.Tensor | np.ndarray | None


@dataclass
class KVReport:
    layer_id: int
    request_ids: Sequence[int | str]
    tier: str
    values: dict[str, np.ndarray]


@dataclass
class StepCapture:
    """What the materializer receives for one step."""

    t_start_ns: int
    t_end_ns: int
    layer_ids: np.ndarray          # per record
    batch_sizes: np.ndarray        # per record
    record_group: np.ndarray       # per record: index into groups
    groups: list[BatchGroup]
    indices: torch.Tensor          # [R, K] snapshot
    scores: torch.Tensor | None    # [R, K] snapshot
    event: Any = None              # torch.cuda.Event recorded after the snapshot, or None on CPU
    kv_reports: list[KVReport] = field(default_factory=list)
    phase: str = "decode"
    buffer: Any = None             # the SnapshotRing buffer (or worker slot) behind ``indices``, returned after use
    # On a GPU the selections and the groups' device vectors (seq_lens, block tables, steps) are snapshotted
    # together into one flat int32 region, so that one copy moves the whole step off the device: ``packed`` is
    # that region and ``packed_layout`` maps "pos" / (group index, field name) to (element offset, shape).
    packed: torch.Tensor | None = None
    packed_layout: dict[Any, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    # requests in the whole step when this capture holds only some of them (one of several worker processes)
    step_requests: int = 0


class SnapshotRing:
    """Reusable snapshot buffers, one per capture slot in flight (the capture ring).

    ``end_step`` concatenates a step's selections into a buffer from here (on the producer's stream for CUDA),
    and the materializer gives it back once it has read it; a worker-process hand-over gives it back as soon as
    the copy out of it is enqueued, with that copy's event. Reuse avoids allocating (and page-faulting, on the
    host) several MB per step; the number of buffers is bounded by the tracer's ring_slots."""

    def __init__(self) -> None:
        self._free: dict[tuple[str, torch.dtype], list[tuple[torch.Tensor, Any]]] = {}
        self._lock = threading.Lock()

    def acquire(self, device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A buffer of at least ``numel`` elements. A CUDA buffer given back with a ``reads_done`` event is
        reused only after it: the caller's current stream waits for the event on the GPU (no host wait)."""
        key = (str(device), dtype)
        with self._lock:
            free = self._free.get(key, [])
            for i, (buf, reads_done) in enumerate(free):
                if buf.numel() >= numel:
                    free.pop(i)
                    if reads_done is not None:
                        torch.cuda.current_stream(buf.device).wait_event(reads_done)
                    return buf
        return torch.empty(max(numel, 1), dtype=dtype, device=device)

    def release(self, buf: torch.Tensor | None, reads_done: Any = None) -> None:
        """Give a buffer back. ``reads_done``: a CUDA event after the last kernel or copy still reading it (the
        buffer can then be handed back as soon as those are enqueued, not once they have run)."""
        if buf is None:
            return
        with self._lock:
            self._free.setdefault((str(buf.device), buf.dtype), []).append((buf, reads_done))


class StepCollector:
    """Accumulates the current step's records on the model thread. One ``add`` holds one layer's [B, K]
    selection or several layers' [L, B, K] at once (what a captured CUDA graph leaves in one static buffer)."""

    __slots__ = ("layer_ids", "batch_sizes", "group_of", "tensors", "scores", "groups", "group_ids",
                 "t_start_ns", "kv_reports", "phase")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.layer_ids: list[int] = []      # per record (a layer of a batch group)
        self.batch_sizes: list[int] = []    # per record
        self.group_of: list[int] = []       # per record
        self.tensors: list[torch.Tensor] = []          # per add: [B, K] or [L, B, K]
        self.scores: list[torch.Tensor | None] = []    # per add
        self.groups: list[BatchGroup] = []
        self.group_ids: dict[tuple[int, int, int, int], int] = {}
        self.t_start_ns = 0
        self.kv_reports: list[KVReport] = []
        self.phase = "decode"

    def __len__(self) -> int:
        return len(self.tensors)

    def add(self, layer_ids: Sequence[int], topk: torch.Tensor, seq_lens: Any, request_ids: Sequence[int | str],
            step: Any, scores: torch.Tensor | None, block_table: torch.Tensor | None) -> None:
        """Record ``topk`` ([B, K] for one layer id, [L, B, K] for L layer ids)."""
        if not self.tensors:
            self.t_start_ns = time.time_ns()
        key = (id(request_ids), id(seq_lens), id(block_table), id(step))
        g = self.group_ids.get(key)
        if g is None:
            g = len(self.groups)
            self.group_ids[key] = g
            self.groups.append(BatchGroup(request_ids=request_ids, seq_lens=seq_lens,  # snapshotted in end_step
                                          block_table=block_table, steps=step))
        n = len(layer_ids)
        self.layer_ids.extend(layer_ids)
        self.batch_sizes.extend([topk.shape[-2]] * n)
        self.group_of.extend([g] * n)
        self.tensors.append(topk)
        self.scores.append(scores)

    def snapshot(self, ring: SnapshotRing | None = None) -> StepCapture:
        """One device copy of everything recorded in this step (called by end_step on the model thread)."""
        idx_list = self.tensors
        k = idx_list[0].shape[-1]
        if any(t.shape[-1] != k for t in idx_list):  # rare: pad to the widest selection with -1
            k = max(t.shape[-1] for t in idx_list)
            idx_list = [torch.nn.functional.pad(t, (0, k - t.shape[-1]), value=-1) for t in idx_list]
        rows = sum(self.batch_sizes)
        first = idx_list[0]
        buffer, packed, layout = None, None, {}
        groups = [BatchGroup(request_ids=g.request_ids, seq_lens=g.seq_lens, block_table=g.block_table,
                             steps=g.steps) for g in self.groups]
        if ring is not None and not first.is_floating_point():
            # int32 snapshot: positions (and block ids, lengths) are < 2**31; half the bytes to copy and sort.
            # On a GPU the groups' device vectors join the selections in the same buffer (one cat, one D2H).
            parts = [t.reshape(-1) for t in idx_list]
            layout["pos"] = (0, (rows, k))
            off = rows * k
            if first.is_cuda:
                for gi, g in enumerate(groups):
                    for name in ("seq_lens", "block_table", "steps"):
                        v = getattr(g, name)
                        if isinstance(v, torch.Tensor) and v.device == first.device and not v.is_floating_point():
                            layout[(gi, name)] = (off, tuple(v.shape))
                            parts.append(v.reshape(-1))
                            off += v.numel()
            buffer = ring.acquire(first.device, torch.int32, off)
            packed = torch.cat(parts, 0, out=buffer[:off])
            indices = packed[: rows * k].view(rows, k)
            for (gi, name), (o, shape) in ((key, v) for key, v in layout.items() if key != "pos"):
                setattr(groups[gi], name, packed[o: o + int(np.prod(shape))].view(shape))
            if not first.is_cuda:
                packed, layout = None, {}
        else:
            indices = torch.cat([t.reshape(-1, k) for t in idx_list], 0)
        scores = None
        if all(s is not None for s in self.scores):
            scores = torch.cat([s.reshape(-1, s.shape[-1]) for s in self.scores], 0)  # type: ignore[union-attr]
            if scores.shape[1] != k:
                scores = None
        for gi, g in enumerate(groups):  # whatever is not in the packed buffer is frozen now
            if (gi, "seq_lens") not in layout:
                g.seq_lens = _snap(g.seq_lens)
            if (gi, "steps") not in layout:
                g.steps = _snap(g.steps)
            if (gi, "block_table") not in layout and g.block_table is not None:
                g.block_table = g.block_table.clone()
        event = None
        if indices.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(indices.device))
        return StepCapture(
            t_start_ns=self.t_start_ns, t_end_ns=time.time_ns(),
            layer_ids=np.asarray(self.layer_ids, dtype=np.int64),
            batch_sizes=np.asarray(self.batch_sizes, dtype=np.int64),
            record_group=np.asarray(self.group_of, dtype=np.int64),
            groups=groups, indices=indices, scores=scores, event=event, kv_reports=self.kv_reports,
            phase=self.phase, buffer=buffer, packed=packed, packed_layout=layout)


def _snap(x: Any) -> Any:
    """Freeze a per-request vector: device tensors are cloned on the producer stream, host data copied."""
    if x is None or isinstance(x, (int, np.integer)):
        return x
    if isinstance(x, torch.Tensor):
        return x.clone() if x.is_cuda else x.detach().to(torch.int64, copy=True).numpy()
    return np.array(x, dtype=np.int64)
