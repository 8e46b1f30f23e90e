"""A small serving engine on the reference model: reference-counted KV blocks, an exact prefix cache, continuous
batching with arrival times, per-request timings, and tracing of A-D.

* ``BlockPool`` — physical blocks with reference counts. A block whose count drops to 0 and that holds a cached
  prefix stays resident (evictable, LRU) until its memory is needed; other blocks return to the free list.
* ``PrefixCache`` — full blocks keyed by a hash chain (hash of the parent block's key and the block's token ids),
  shared between requests. A new request reuses the longest cached chain of its prompt (at least one prompt token
  is always computed, as vLLM does), really skipping that part of the prefill.
* ``Engine`` — admits requests in arrival order (honouring arrival times on a wall clock scaled by ``time_scale``),
  prefills them, decodes all running requests one token per step, and lets each leave on EOS, its budget
  (``max_new_tokens <= 0``: until EOS or the context limit) or the context limit. On a GPU, ``cuda_graphs=True``
  replays each decode step from a CUDA graph, as vLLM and SGLang decode: the batch is padded up to a power of two
  and the block table's width up to a power of two of blocks, so a handful of graphs serve a whole run.

Mapping to real engines: docs/engine.md.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .dsa import DSATransformer, MoE
from .graphs import DecodeGraph
from .kv import BlockAllocator, OutOfBlocks, PagedKVCache


class BlockPool(BlockAllocator):
    """Reference-counted physical blocks; evictable cached blocks are reclaimed least recently released first."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__(num_blocks)
        self.ref = [0] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0, LRU order
        self.on_evict: Any = None  # PrefixCache drops its entry for a reclaimed block
        self.is_cached: Any = lambda block: False  # PrefixCache: does this block hold a cached prefix?
        self.evictions = 0

    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(b)
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are referenced")
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.evictable.pop(b, None)
        self.ref[b] += 1

    def release(self, b: int) -> None:
        if self.ref[b] <= 0:
            raise RuntimeError(f"block {b} released more often than referenced")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.is_cached(b):  # keeps its KV for a later prefix hit until the memory is needed
                self.evictable[b] = None
            else:
                self.free.append(b)

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + b"|" + ",".join(map(str, tokens)).encode(), digest_size=16).digest()


class PrefixCache:
    """Hash-chained full blocks -> physical block ids (exact: a key covers the whole prefix up to its block)."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        pool.on_evict = self._evicted
        pool.is_cached = self.is_cached
        self.hits = 0
        self.queries = 0

    def _evicted(self, block: int) -> None:
        key = self.key_of.pop(block, None)
        if key is not None:
            self.by_key.pop(key, None)

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        out, parent = [], b""
        for i in range(len(tokens) // self.block_size):
            parent = block_key(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            out.append(parent)
        return out

    def match(self, tokens: Sequence[int]) -> tuple[list[int], list[bytes]]:
        """Physical blocks of the longest cached full-block prefix (leaving >= 1 token to compute), referenced."""
        self.queries += 1
        keys = self.keys(tokens[: len(tokens) - 1])
        blocks = []
        for k in keys:
            b = self.by_key.get(k)
            if b is None:
                break
            blocks.append(b)
        for b in blocks:
            self.pool.incref(b)
        if blocks:
            self.hits += 1
        return blocks, keys[: len(blocks)]

    def register(self, tokens: Sequence[int], table: list[int]) -> None:
        """After a prefill: make the request's full prompt blocks findable (first writer wins)."""
        for i, k in enumerate(self.keys(tokens)):
            if k not in self.by_key and table[i] not in self.key_of:
                self.by_key[k] = table[i]
                self.key_of[table[i]] = k

    def is_cached(self, block: int) -> bool:
        return block in self.key_of


@dataclass
class Request:
    request_id: int | str
    prompt: list[int]
    max_new_tokens: int = 16
    arrival_s: float = 0.0
    # filled by the engine
    output: list[int] = field(default_factory=list)
    prefix_blocks: int = 0
    t_arrival: float = 0.0
    t_admit: float = 0.0
    t_first: float = 0.0
    t_done: float = 0.0
    finish_reason: str = ""

    def timings(self) -> dict[str, float]:
        n = len(self.output)
        return {"queue_s": self.t_admit - self.t_arrival, "ttft_s": self.t_first - self.t_arrival,
                "tpot_s": (self.t_done - self.t_first) / (n - 1) if n > 1 else 0.0,
                "e2e_s": self.t_done - self.t_arrival}


class Engine:
    def __init__(self, model: DSATransformer, num_blocks: int, *, max_batch: int = 8, max_tokens_per_step: int = 8192,
                 prefix_caching: bool = True, tracer: Any = None, eos_id: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, chunk: int = 128,
                 time_scale: float = 1.0, cuda_graphs: bool = False) -> None:
        if cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError("cuda_graphs=True needs device='cuda': a CUDA graph replays GPU work only")
        self.model = model
        self.args = model.args
        self.pool = BlockPool(num_blocks)
        # With CUDA graphs the cache holds one block more than the pool hands out: the rows that pad a batch up
        # to a captured size write their (never read) KV entry there.
        self.cache = PagedKVCache(self.args, num_blocks + int(cuda_graphs), device=device, dtype=dtype,
                                  allocator=self.pool)
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}  # (batch, table width) -> its captured step
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.prefix = PrefixCache(self.pool, self.args.kv_block_size) if prefix_caching else None
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.tracer = tracer
        self.eos_id = eos_id
        self.device = torch.device(device)
        self.chunk = chunk
        self.time_scale = time_scale
        self.steps = 0
        self.on_finish: Any = None  # called with each finished Request (progress bars)

    # ------------------------------------------------------------------ requests
    def _admit(self, req: Request, now: float) -> None:
        req.t_admit = now
        blocks, keys = self.prefix.match(req.prompt) if self.prefix is not None else ([], [])
        self.cache.add_sequence(req.request_id, blocks)
        req.prefix_blocks = len(blocks)
        if self.tracer is not None:
            self.tracer.start_request(req.request_id, len(req.prompt))
            if blocks:
                self.tracer.record_prefix(req.request_id, cached_blocks=len(blocks),
                                          hit_tokens=len(blocks) * self.args.kv_block_size,
                                          physical_block_ids=blocks, prefix_key=keys[-1].hex())
        start = self.cache.lengths[req.request_id]
        rest = req.prompt[start:]
        self.cache.reserve(req.request_id, len(rest))
        logits = self.model(torch.tensor([rest], device=self.device), torch.tensor([start], device=self.device),
                            self.cache, self.cache.block_table([req.request_id]), chunk=self.chunk, last_only=True,
                            tracer=self.tracer, request_ids=[req.request_id], phase="prefill")
        self.cache.advance(req.request_id, len(rest))
        if self.prefix is not None:
            self.prefix.register(req.prompt, self.cache.tables[req.request_id])
        req.output.append(int(logits[0, -1].argmax()))
        req.t_first = self._now()
        if self.tracer is not None:
            self.tracer.end_prefill(req.request_id)

    def _finished(self, req: Request) -> str:
        n = len(req.output)
        if self.eos_id is not None and req.output[-1] == self.eos_id:
            return "eos"
        if 0 < req.max_new_tokens <= n:
            return "length"
        if len(req.prompt) + n >= self.args.max_seq_len:
            return "context"
        return ""

    def _now(self) -> float:
        return (time.perf_counter() - self._t0) * self.time_scale

    # ------------------------------------------------------------------ loop
    @torch.no_grad()
    def run(self, requests: Sequence[Request]) -> list[Request]:
        """Serve requests (admitted in arrival order) to completion; returns them with outputs and timings."""
        for r in requests:
            if not 0 < len(r.prompt) < self.args.max_seq_len:
                raise ValueError(f"request {r.request_id!r}: prompt of {len(r.prompt)} tokens does not fit "
                                 f"max_seq_len={self.args.max_seq_len}")
        waiting = sorted(requests, key=lambda r: r.arrival_s)
        running: list[Request] = []
        done: list[Request] = []
        self._t0 = time.perf_counter()
        while waiting or running:
            now = self._now()
            if not running and waiting and waiting[0].arrival_s > now:  # idle until the next arrival
                time.sleep((waiting[0].arrival_s - now) / self.time_scale)
                now = self._now()
            budget = self.max_tokens_per_step
            while waiting and waiting[0].arrival_s <= now and len(running) < self.max_batch:
                req = waiting[0]
                if running and len(req.prompt) > budget:
                    break  # its prefill does not fit this step's token budget; next step
                need = -(-(len(req.prompt) + 1) // self.args.kv_block_size)
                if need > self.pool.num_free:
                    if not running:
                        raise OutOfBlocks(f"request {req.request_id!r} needs {need} blocks; the pool has "
                                          f"{self.pool.num_free} free")
                    break
                waiting.pop(0)
                req.t_arrival = req.arrival_s
                self._admit(req, now)
                budget -= len(req.prompt)
                reason = self._finished(req)
                if reason:
                    self._finish(req, reason, done)
                else:
                    running.append(req)
            if not running:
                continue
            self._decode_step(running)
            still = []
            for req in running:
                reason = self._finished(req)
                if reason:
                    self._finish(req, reason, done)
                else:
                    still.append(req)
            running = still
        return done

    def _decode_step(self, running: list[Request]) -> None:
        rids = [r.request_id for r in running]
        for rid in rids:
            self.cache.reserve(rid, 1)
        start = torch.tensor([self.cache.lengths[r] for r in rids], device=self.device)
        tokens = torch.tensor([[r.output[-1]] for r in running], device=self.device)
        if self.cuda_graphs and len(rids) <= MoE.DENSE_ROUTING_MAX_TOKENS:
            logits = self._replay(rids, tokens, start)
        else:
            logits = self.model(tokens, start, self.cache, self.cache.block_table(rids), chunk=self.chunk,
                                tracer=self.tracer, request_ids=rids)
        for rid in rids:
            self.cache.advance(rid, 1)
        if self.tracer is not None:
            self.tracer.end_step()
        for req, tok in zip(running, logits[:, -1].argmax(-1).tolist()):
            req.output.append(tok)
        self.steps += 1

    def _replay(self, rids: list, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """One decode step from the CUDA graph of its (batch, width) bucket; returns the real rows' logits.

        The batch is padded up to the next power of two with rows that decode token 0 at position 0 into the
        cache's spare block, and the table's width up to the next power of two of blocks (at most the context
        limit): the graph's indexer then scores that many positions, masked past each sequence's length as in
        eager decoding. Only the real rows are traced and returned."""
        B = len(rids)
        width = max(len(self.cache.tables[r]) for r in rids)
        most = -(-self.args.max_seq_len // self.cache.block_size)
        Bp, Wp = _pow2_at_least(B), max(width, min(_pow2_at_least(width), most))
        graph = self.graphs.get((Bp, Wp))
        if graph is None:
            graph = self.graphs[(Bp, Wp)] = DecodeGraph(self.model, self.cache, Bp, Wp, pool=self._graph_pool)
        table = self.cache.block_table(rids, width=Wp)
        if Bp > B:
            pad = torch.full((Bp - B, Wp), -1, dtype=table.dtype, device=self.device)
            pad[:, 0] = self.cache.num_blocks - 1  # the spare block
            table = torch.cat([table, pad])
            tokens = torch.cat([tokens, tokens.new_zeros(Bp - B, 1)])
            start = torch.cat([start, start.new_zeros(Bp - B)])
        return graph(tokens, start, table, tracer=self.tracer, request_ids=rids)[:B]

    def _finish(self, req: Request, reason: str, done: list[Request]) -> None:
        req.finish_reason = reason
        req.t_done = self._now()
        self.cache.free(req.request_id)
        if self.tracer is not None:
            t = req.timings()
            self.tracer.end_request(req.request_id, {
                "dsa.finish_reason": reason, "dsa.generated_tokens": len(req.output),
                "dsa.prefix_blocks": req.prefix_blocks, "dsa.queue_s": t["queue_s"], "dsa.ttft_s": t["ttft_s"],
                "dsa.tpot_s": t["tpot_s"], "dsa.e2e_s": t["e2e_s"]})
        done.append(req)
        if self.on_finish is not None:
            self.on_finish(req)


def _pow2_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
