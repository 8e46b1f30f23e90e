"""Decode steps replayed from a CUDA graph.

Why: in eager mode the reference model is launch-bound on a GPU. A decode step of the ``small`` preset is about
3,500 aten calls and 450 kernels, ~19 ms of Python and dispatch whatever the batch or context, so eager timings
measure the host, not attention. A CUDA graph replays every kernel of the step with one launch, which leaves the
GPU's own work: what sparse vs dense attention actually changes.

Shapes are fixed at capture: the batch size and the block-table width W, and the indexer scores W * block_size
context positions every step (positions past a sequence's length are masked, as in eager mode, so the selections
and logits are those of eager decoding). One graph serves every later step while the batch and the table width
stay the same; an engine keeps one per (batch size, width) bucket.

Tracing keeps working: the captured step copies each layer's top-k into one static [L, B, K] buffer, and after
each replay the whole buffer goes to ``tracer.record_topk`` in one call (all L layer ids) with the caller's block
table: the same records an eager forward hands over layer by layer (the caller then ends the step before the next
replay, as it does in eager mode).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .dsa import DSATransformer, MoE
from .kv import PagedKVCache


class _TopkRecorder:
    """Stands in for the tracer during capture: each layer's [B, K] selection becomes a copy into ``buf``."""

    enabled = True

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf

    def record_topk(self, layer_id: int, topk: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        self.buf[layer_id].copy_(topk)


class DecodeGraph:
    """One decode step of ``model`` over ``cache``, captured on the first call and replayed afterwards.

    ``graph(tokens [B, 1], start_pos [B], table [B, w <= W])`` returns the logits [B, 1, vocab] (a static buffer,
    overwritten by the next call: read it, or clone it, before). With ``tracer``, the first ``len(request_ids)``
    rows are traced (an engine pads its batch up to a captured size with rows it does not trace). The first call runs the step eagerly a few times
    to warm up and then captures it; those runs write the new tokens' KV entries to the same slots with the same
    values the replay writes, so they leave the cache as one step would."""

    def __init__(self, model: DSATransformer, cache: PagedKVCache, batch_size: int, table_width: int,
                 attn: str = "sparse", warmup: int = 2, pool: Any = None) -> None:
        """``pool``: a ``torch.cuda.graph_pool_handle()`` shared by graphs that are never replayed concurrently
        (e.g. one per batch bucket, or sparse and dense side by side), so their temporaries share memory."""
        if not torch.cuda.is_available() or cache.device.type != "cuda":
            raise ValueError("DecodeGraph needs the model and its KV cache on a CUDA device")
        if batch_size > MoE.DENSE_ROUTING_MAX_TOKENS:
            raise ValueError(f"DecodeGraph supports batches of at most {MoE.DENSE_ROUTING_MAX_TOKENS} sequences "
                             "(larger batches route experts with a host synchronisation, which a graph cannot hold)")
        if table_width < 1:
            raise ValueError("table_width must be at least 1")
        self.model, self.cache, self.attn, self.warmup, self.pool = model, cache, attn, warmup, pool
        self.batch_size, self.table_width = batch_size, table_width
        dev = cache.device
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.start_pos = torch.zeros(batch_size, dtype=torch.long, device=dev)
        self.table = torch.full((batch_size, table_width), -1, dtype=torch.long, device=dev)
        self.topk = torch.full((model.args.n_layers, batch_size, model.args.index_topk), -1, dtype=torch.int32,
                               device=dev)  # int32: the tracer's snapshot type (positions are < 2**31)
        self.logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor, table: torch.Tensor, *, tracer: Any = None,
                 request_ids: Sequence[Any] | None = None) -> torch.Tensor:
        B, W = self.batch_size, self.table_width
        if tokens.shape != (B, 1) or start_pos.shape != (B,) or table.dim() != 2 or table.shape[0] != B \
                or table.shape[1] > W:
            raise ValueError(f"this graph decodes tokens [{B}, 1], start_pos [{B}] and a table [{B}, <= {W}]; got "
                             f"{tuple(tokens.shape)}, {tuple(start_pos.shape)} and {tuple(table.shape)}")
        self.tokens.copy_(tokens)
        self.start_pos.copy_(start_pos)
        self.table[:, :table.shape[1]].copy_(table)
        if table.shape[1] < W:
            self.table[:, table.shape[1]:].fill_(-1)
        if self._graph is None:
            self._capture()
        assert self._graph is not None and self.logits is not None
        self._graph.replay()
        if tracer is not None and getattr(tracer, "enabled", True):
            rids = list(request_ids) if request_ids is not None else list(range(B))
            n = len(rids)  # fewer ids than rows: the rest pad the batch up to the captured size, untraced
            if n > B:
                raise ValueError(f"{n} request ids for a batch of {B}")
            # all layers in one call: the tracer snapshots the [L, B, K] buffer with one copy
            tracer.record_topk(range(self.model.args.n_layers), self.topk if n == B else self.topk[:, :n],
                               (start_pos + 1)[:n], rids, block_table=table[:n])
        return self.logits

    def _step(self) -> torch.Tensor:
        return self.model(self.tokens, self.start_pos, self.cache, self.table, attn=self.attn,
                          tracer=_TopkRecorder(self.topk), last_only=True, phase="decode",
                          context_len=self.table_width * self.cache.block_size)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy caches, cuBLAS workspaces, allocator pools
            for _ in range(self.warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        # the warm-up's temporaries stay cached for the side stream only; give them back before the capture takes
        # its own (at long contexts they are tens of GiB)
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits = self._step()
        self._graph = graph
