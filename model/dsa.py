"""Reference DeepSeek-V3.2 model with DeepSeek Sparse Attention, in plain PyTorch (CPU and CUDA).

Faithful to DeepSeek-V3.2-Exp's architecture: MLA (q LoRA, kv LoRA latent, decoupled RoPE with YaRN scaling),
the lightning indexer (index heads over q LoRA, LayerNorm'd shared key, Hadamard rotation of q and k, ReLU scores
weighted per head, top-k), MoE with sigmoid routing over limited expert groups, a shared expert and route scale,
dense first layers, RMSNorm. Differences, on purpose: no FP8 (weights and indexer keys in the compute dtype; FP8
checkpoints are dequantised by checkpoint.py) and no custom kernels.

Attention is **truly sparse**: each query gathers only its top-k latent KV entries from the paged cache and
attends to them in the absorbed MLA form, in decode and in chunked prefill alike, so no [L, L] (or [L, T]) score
matrix over the whole context is built for attention (the indexer's own [chunk, T] scores are built a chunk at a
time). ``attn="dense"`` keeps the reference's dense-then-mask computation for testing.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .kv import PagedKVCache
from .parallel import (ColumnParallelLinear, ParallelHead, RowParallelLinear, VocabParallelEmbedding, all_reduce,
                       split, world)


# ----------------------------------------------------------------------------------------------- basic layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float32, as the reference; one fused op where torch has one (fewer launches per decode step)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def yarn_freqs(args: ModelArgs) -> torch.Tensor:
    """Complex RoPE rotations [max_seq_len, rope_dim / 2] with YaRN frequency interpolation beyond the original
    context (as DeepSeek-V3's precompute_freqs_cis)."""
    dim, base, factor = args.qk_rope_head_dim, args.rope_theta, args.rope_factor
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.max_seq_len > args.original_seq_len:
        def corr(rot: float) -> float:
            return dim * math.log(args.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr(args.beta_fast)), 0)
        high = min(math.ceil(corr(args.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    t = torch.arange(args.max_seq_len, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [..., S, (H,) D] with freqs [B, S, D/2] (complex) already gathered for each token's position."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = freqs if xc.dim() == freqs.dim() else freqs.unsqueeze(-2)
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


@lru_cache(maxsize=8)
def _hadamard(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device=device, dtype=dtype)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Hadamard rotation of the last dimension (the indexer rotates q and k before quantising them;
    q.k is unchanged by it, it spreads outliers)."""
    return x @ _hadamard(x.shape[-1], str(x.device), x.dtype)


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


# ----------------------------------------------------------------------------------------------- MoE
class MLP(nn.Module):
    """SwiGLU feed-forward; ``parallel``: intermediate size split across tensor-parallel ranks."""

    def __init__(self, dim: int, inter: int, parallel: bool = True, reduce: bool = True) -> None:
        super().__init__()
        if parallel:
            self.w1, self.w3 = ColumnParallelLinear(dim, inter), ColumnParallelLinear(dim, inter)
            self.w2: nn.Module = RowParallelLinear(inter, dim, reduce=reduce)
        else:
            self.w1, self.w2, self.w3 = linear(dim, inter), linear(inter, dim), linear(dim, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2((F.silu(self.w1(x).float()) * self.w3(x).float()).to(x.dtype))


class Gate(nn.Module):
    """Sigmoid (or softmax) routing restricted to the best ``n_limited_groups`` expert groups."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))
        self.bias = nn.Parameter(torch.zeros(args.n_routed_experts)) if args.gate_bias else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        scores = F.linear(x.float(), self.weight.float())
        scores = scores.softmax(-1) if a.score_func == "softmax" else scores.sigmoid()
        original = scores
        if self.bias is not None:
            scores = scores + self.bias.float()
        if a.n_expert_groups > 1:
            g = scores.view(x.shape[0], a.n_expert_groups, -1)
            group_scores = g.amax(-1) if self.bias is None else g.topk(2, -1)[0].sum(-1)
            keep = group_scores.topk(a.n_limited_groups, -1)[1]
            mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            scores = g.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1)
        idx = scores.topk(a.n_activated_experts, -1)[1]
        w = original.gather(1, idx)
        if a.score_func == "sigmoid":
            w = w / w.sum(-1, keepdim=True)
        return w * a.route_scale, idx


class MoE(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        ws, rank = world()
        n_local = split(args.n_routed_experts, "n_routed_experts")
        self.expert_start, self.expert_end = rank * n_local, (rank + 1) * n_local
        # every rank keeps the full list (names match the checkpoint); only its own experts hold weights
        self.experts = nn.ModuleList([MLP(args.dim, args.moe_inter_dim, parallel=False)
                                      if self.expert_start <= i < self.expert_end else None
                                      for i in range(args.n_routed_experts)])
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, reduce=False)

    DENSE_ROUTING_MAX_TOKENS = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = self.gate(x)
        if x.shape[0] <= self.DENSE_ROUTING_MAX_TOKENS:
            y = self._routed_dense(x, weights, idx)
        else:
            y = self._routed_sparse(x, weights, idx)
        y = all_reduce(y + self.shared_experts(x).float())  # one reduction for routed and shared partial sums
        return y.to(x.dtype).reshape(shape)

    def _routed_sparse(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each expert on its own tokens (prefill): a host list of the experts in use, then gathers."""
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in torch.unique(idx).tolist():
            if not self.expert_start <= e < self.expert_end:
                continue
            rows, slot = torch.where(idx == e)
            y.index_add_(0, rows, (self.experts[e](x[rows]).float() * weights[rows, slot].unsqueeze(-1)))
        return y

    def _routed_dense(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Every local expert on every token, weighted by its routing weight (0 when not routed): no host
        synchronisation, at most n_experts / n_activated times the FLOPs of routing, cheap for a few decode tokens.

        The experts run as three batched matmuls over weights stacked for this call (a few launches instead of
        ~11 per expert: decode on a GPU is launch-bound), in the same dtypes as ``MLP.forward``. The stacks are
        rebuilt every call rather than cached, so loading or moving weights never leaves a stale copy; they cost
        one read of the local experts' weights."""
        experts = [self.experts[e] for e in range(self.expert_start, self.expert_end)]
        w1 = torch.stack([m.w1.weight for m in experts]).transpose(1, 2)  # [E, dim, inter]
        w3 = torch.stack([m.w3.weight for m in experts]).transpose(1, 2)
        w2 = torch.stack([m.w2.weight for m in experts]).transpose(1, 2)  # [E, inter, dim]
        xe = x.unsqueeze(0).expand(len(experts), -1, -1)                  # [E, T, dim]
        h = (F.silu(torch.bmm(xe, w1).float()) * torch.bmm(xe, w3).float()).to(x.dtype)
        y = torch.bmm(h, w2).float()                                      # [E, T, dim]
        dense_w = torch.zeros(x.shape[0], self.args.n_routed_experts, device=x.device, dtype=torch.float32)
        dense_w.scatter_(1, idx, weights.float())
        local_w = dense_w[:, self.expert_start:self.expert_end].t().unsqueeze(-1)  # [E, T, 1]
        return (y * local_w).sum(0)


# ----------------------------------------------------------------------------------------------- attention
class Indexer(nn.Module):
    """The lightning indexer: scores past tokens for each query and keeps the top-k."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.n_heads, self.head_dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
        self.wq_b = linear(args.q_lora_rank, self.n_heads * self.head_dim)
        self.wk = linear(args.dim, self.head_dim)
        self.k_norm = LayerNorm(self.head_dim)
        self.weights_proj = linear(args.dim, self.n_heads)
        self.softmax_scale = self.head_dim ** -0.5

    def _rope_first(self, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        pe, nope = torch.split(t, [self.rope_dim, self.head_dim - self.rope_dim], -1)
        return torch.cat([apply_rope(pe, freqs), nope], -1)

    def keys(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """[B, S, head_dim] index keys of new tokens (what the cache stores)."""
        return hadamard_rotate(self._rope_first(self.k_norm(self.wk(x)), freqs))

    def queries(self, x: torch.Tensor, qr: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        q = self.wq_b(qr).view(B, S, self.n_heads, self.head_dim)
        q = hadamard_rotate(self._rope_first(q, freqs))
        w = self.weights_proj(x).float() * (self.n_heads ** -0.5) * self.softmax_scale
        return q, w

    SCORE_BUDGET_BYTES = 1 << 29  # per-head-group [B, S, Hg, T] float32 scores: at most 512 MiB

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """index_score[b, s, t] = sum_h w[b,s,h] * relu(q[b,s,h] . k[b,t]), heads in groups sized so that the
        per-head scores never exceed SCORE_BUDGET_BYTES (all heads at once in decode, fewer per group in prefill).

        Two batched matmuls per group: q.k in float32 (bf16 inputs multiply on the tensor cores with float32
        output, no float copy of the keys), ReLU in place, then the head-weighted sum accumulated into the result."""
        B, S, H, D = q.shape
        T = keys.shape[1]
        group = max(1, min(H, self.SCORE_BUDGET_BYTES // max(1, B * S * T * 4)))
        keys_t = keys.transpose(1, 2)  # [B, D, T]
        if not on_tensor_cores(keys_t):
            keys_t = keys_t.float()  # once for all head groups (bmm_f32 would convert it per group)
        out = torch.zeros(B * S, 1, T, device=q.device, dtype=torch.float32)
        for h0 in range(0, H, group):
            h1 = min(H, h0 + group)
            g = h1 - h0
            s = bmm_f32(q[:, :, h0:h1].reshape(B, S * g, D), keys_t).relu_()  # [B, S*g, T]
            out.baddbmm_(w[:, :, h0:h1].reshape(B * S, 1, g).float(), s.view(B * S, g, T))
        return out.view(B, S, T)


def bmm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b with a float32 result. On CUDA, half-precision inputs go to the tensor cores with float32
    output (each product of two bf16 values is exact in float32, so this equals the float32 matmul up to summation
    order) instead of first copying both operands to float32; elsewhere both are converted."""
    if on_tensor_cores(a) and b.dtype == a.dtype:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def on_tensor_cores(t: torch.Tensor) -> bool:
    """Whether ``bmm_f32`` multiplies ``t`` as it is (half precision on CUDA) rather than as a float32 copy."""
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        a = self.args = args
        self.layer_id = layer_id
        self.wq_a = linear(a.dim, a.q_lora_rank)
        self.q_norm = RMSNorm(a.q_lora_rank)
        self.n_local_heads = split(a.n_heads, "n_heads")
        self.wq_b = ColumnParallelLinear(a.q_lora_rank, a.n_heads * a.qk_head_dim)
        self.wkv_a = linear(a.dim, a.kv_lora_rank + a.qk_rope_head_dim)
        self.kv_norm = RMSNorm(a.kv_lora_rank)
        self.wkv_b = ColumnParallelLinear(a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim))
        self.wo = RowParallelLinear(a.n_heads * a.v_head_dim, a.dim)
        self.softmax_scale = a.qk_head_dim ** -0.5
        if a.max_seq_len > a.original_seq_len:
            m = 0.1 * a.mscale * math.log(a.rope_factor) + 1.0
            self.softmax_scale *= m * m
        self.indexer = Indexer(a)

    def forward(self, x: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        a = self.args
        B, S, _ = x.shape
        qr = self.q_norm(self.wq_a(x))
        H = self.n_local_heads
        q = self.wq_b(qr).view(B, S, H, a.qk_head_dim)
        q_nope, q_pe = torch.split(q, [a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, ctx.freqs)
        latent, k_pe = torch.split(self.wkv_a(x), [a.kv_lora_rank, a.qk_rope_head_dim], -1)
        latent = self.kv_norm(latent)
        k_pe = apply_rope(k_pe, ctx.freqs)
        cache = ctx.cache
        cache.write(self.layer_id, ctx.slots, latent, k_pe, self.indexer.keys(x, ctx.freqs))

        wkv_b = self.wkv_b.weight.view(H, -1, a.kv_lora_rank)
        w_k, w_v = wkv_b[:, : a.qk_nope_head_dim], wkv_b[:, a.qk_nope_head_dim:]
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope.float(), w_k.float())  # absorbed: queries in latent space
        iq, iw = self.indexer.queries(x, qr, ctx.freqs)
        idx_keys = cache.context(cache.index_k[self.layer_id], ctx.table, ctx.T)  # [B, T, D] the whole context
        out = torch.empty(B, S, H, a.kv_lora_rank, device=x.device, dtype=torch.float32)
        for c0 in range(0, S, ctx.chunk):
            c1 = min(S, c0 + ctx.chunk)
            topk = self._topk(iq[:, c0:c1], iw[:, c0:c1], idx_keys, ctx.positions[:, c0:c1])
            if ctx.record is not None:
                ctx.record(self.layer_id, topk, c0)
            if ctx.attn == "sparse":
                out[:, c0:c1] = self._sparse(q_lat[:, c0:c1], q_pe[:, c0:c1], topk, ctx)
            else:
                out[:, c0:c1] = self._dense(q_lat[:, c0:c1], q_pe[:, c0:c1], topk, ctx)
        o = torch.einsum("bshc,hdc->bshd", out, w_v.float()).to(x.dtype)
        return self.wo(o.flatten(2))

    def _topk(self, iq: torch.Tensor, iw: torch.Tensor, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[B, c, index_topk] selected positions of each query (causal), -1 where the context is shorter."""
        s = self.indexer.scores(iq, iw, keys)
        T = keys.shape[1]
        ar = torch.arange(T, device=s.device)
        # ReLU scores are exactly 0 for keys no head likes; break such ties towards recent positions, identically
        # in every computation shape (the offset is far below float32 resolution of any non-zero score)
        s = s + ar.float() * 1e-30
        s = s.masked_fill(ar.view(1, 1, T) > pos.unsqueeze(-1), float("-inf"))
        k = min(self.args.index_topk, T)
        vals, idx = s.topk(k, -1)
        idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
        if k < self.args.index_topk:
            idx = F.pad(idx, (0, self.args.index_topk - k), value=-1)
        return idx

    def _sparse(self, q_lat: torch.Tensor, q_pe: torch.Tensor, topk: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        """Attention over each query's top-k entries only: gather [B, c, K] latent rows from the paged cache."""
        cache = ctx.cache
        valid = topk >= 0
        slots = cache.slots(ctx.table, topk.clamp(min=0).flatten(1)).view_as(topk)
        lat = cache.latent[self.layer_id][slots].float()  # [B, c, K, kv_lora]
        pe = cache.rope[self.layer_id][slots].float()     # [B, c, K, rope]
        scores = (torch.einsum("bshc,bskc->bshk", q_lat, lat)
                  + torch.einsum("bshr,bskr->bshk", q_pe.float(), pe)) * self.softmax_scale
        scores = scores.masked_fill(~valid.unsqueeze(2), float("-inf")).softmax(-1)
        return torch.einsum("bshk,bskc->bshc", scores, lat)

    def _dense(self, q_lat: torch.Tensor, q_pe: torch.Tensor, topk: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        """The reference's way: scores over the whole context, then everything outside the top-k masked."""
        cache = ctx.cache
        lat = cache.context(cache.latent[self.layer_id], ctx.table, ctx.T).float()  # [B, T, kv_lora]
        pe = cache.context(cache.rope[self.layer_id], ctx.table, ctx.T).float()
        scores = (torch.einsum("bshc,btc->bsht", q_lat, lat)
                  + torch.einsum("bshr,btr->bsht", q_pe.float(), pe)) * self.softmax_scale
        mask = torch.full(scores.shape[:2] + scores.shape[3:], float("-inf"), device=scores.device)
        valid_idx = torch.where(topk >= 0, topk, topk.max(-1, keepdim=True).values)  # padding repeats a real pick
        mask.scatter_(-1, valid_idx, 0.0)
        scores = (scores + mask.unsqueeze(2)).softmax(-1)
        return torch.einsum("bsht,btc->bshc", scores, lat)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.attn = MLA(args, layer_id)
        self.ffn = MLP(args.dim, args.inter_dim) if layer_id < args.n_dense_layers else MoE(args)
        self.attn_norm = RMSNorm(args.dim)
        self.ffn_norm = RMSNorm(args.dim)

    def forward(self, x: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.ffn(self.ffn_norm(x))


class StepContext:
    """Per-forward state shared by the layers: positions, cache slots, RoPE rotations and the trace hook."""

    def __init__(self, cache: PagedKVCache, table: torch.Tensor, start_pos: torch.Tensor, S: int,
                 freqs_all: torch.Tensor, attn: str, chunk: int, record: Any, context_len: int | None = None) -> None:
        dev = table.device
        self.cache, self.table, self.attn, self.chunk, self.record = cache, table, attn, chunk, record
        self.positions = start_pos.view(-1, 1) + torch.arange(S, device=dev).view(1, -1)  # [B, S]
        self.seq_lens = start_pos + S
        # the context the indexer scores: the longest sequence (the one host sync of a forward) unless the caller
        # fixes it (CUDA graphs); positions past a sequence's length are masked as the future is
        self.T = int(self.seq_lens.max()) if context_len is None else context_len
        self.slots = cache.slots(table, self.positions)
        self.freqs = freqs_all[self.positions]


class DSATransformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = VocabParallelEmbedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([Block(args, i) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim)
        self.head = ParallelHead(args.dim, args.vocab_size)
        self.freqs_cis = yarn_freqs(args)  # complex64; not a buffer so that .to(dtype) leaves it complex

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "DSATransformer":
        """Seeded, deterministic random initialisation. Each parameter gets its own generator (seed, name), and
        tensor-parallel ranks take their slice of the full tensor, so TP=N holds exactly the weights of TP=1."""
        from .checkpoint import full_shape, shard_for_rank

        base = self.args.seed if seed is None else seed
        ws, rank = world()
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                g = torch.Generator().manual_seed(base * 1_000_003 + (hash_name(name) % 1_000_000_007))
                shape = full_shape(name, tuple(p.shape), ws)
                std = 0.02 if len(shape) < 2 else shape[-1] ** -0.5
                full = torch.randn(shape, generator=g) * std
                p.copy_(shard_for_rank(name, full, ws, rank))
        return self

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, start_pos: torch.Tensor, cache: PagedKVCache, table: torch.Tensor,
                *, attn: str = "sparse", chunk: int = 128, tracer: Any = None,
                request_ids: Sequence[Any] | None = None, last_only: bool = False,
                phase: str | None = None, context_len: int | None = None) -> torch.Tensor:
        """Run S new tokens per sequence (tokens [B, S], already reserved in ``cache``) and return logits.

        ``start_pos`` [B]: tokens already cached per sequence. ``phase``: "decode" (default when S == 1) or
        "prefill" (default otherwise). In decode each layer's top-k goes to ``tracer.record_topk`` (A, with the
        block table for B; the caller ends the step); in prefill, when ``tracer.config.trace_prefill``, the last
        query's top-k of every chunk is recorded and each chunk ends its own ``phase="prefill"`` step here.
        Nothing is called when ``tracer`` is None. ``context_len``: a fixed number of context positions to score
        (at least the longest sequence, at most what ``table`` covers) instead of reading the longest length back
        from the GPU, so that the forward has static shapes and no host synchronisation (``graphs.DecodeGraph``)."""
        if attn not in ("sparse", "dense"):
            raise ValueError("attn must be 'sparse' or 'dense'")
        B, S = tokens.shape
        record = None
        prefill_rows: dict[int, list[tuple[int, torch.Tensor]]] = {}
        tracing = tracer is not None and getattr(tracer, "enabled", True)
        rids = list(request_ids) if request_ids is not None else list(range(B))
        phase = phase or ("decode" if S == 1 else "prefill")
        if phase not in ("decode", "prefill"):
            raise ValueError("phase must be 'decode' or 'prefill'")
        if tracing and phase == "decode":
            if S != 1:
                raise ValueError("a decode step takes one token per sequence")
            seq_lens = start_pos + 1

            def record(layer_id: int, topk: torch.Tensor, c0: int) -> None:
                tracer.record_topk(layer_id, topk[:, 0], seq_lens, rids, block_table=table)
        elif tracing and getattr(getattr(tracer, "config", None), "trace_prefill", False):
            def record(layer_id: int, topk: torch.Tensor, c0: int) -> None:
                # layers run outside chunks, so a chunk's selections are complete only after the last layer: keep
                # the last query's [B, K] of each (chunk, layer) and hand them over per chunk below
                prefill_rows.setdefault(c0, []).append((layer_id, topk[:, -1]))
        if self.freqs_cis.device != tokens.device:
            self.freqs_cis = self.freqs_cis.to(tokens.device)
        if context_len is not None and not 0 < context_len <= table.shape[1] * cache.block_size:
            raise ValueError(f"context_len={context_len} must be in 1..{table.shape[1] * cache.block_size} "
                             "(the positions the block table covers)")
        ctx = StepContext(cache, table, start_pos, S, self.freqs_cis, attn, chunk, record, context_len)
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, ctx)
        for c0, rows in prefill_rows.items():  # A in prefill: one traced step per chunk (its last query)
            last = ctx.positions[:, min(S, c0 + chunk) - 1]
            for layer_id, topk in rows:
                tracer.record_topk(layer_id, topk, last + 1, rids, step=last, block_table=table)
            tracer.end_step("prefill")
        h = self.norm(h[:, -1:] if last_only else h)
        return self.head(h).float()


def hash_name(name: str) -> int:
    """A stable (process-independent) hash of a parameter name."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big")


def build_model(args: ModelArgs, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DSATransformer:
    """A seeded random model (or load a converted checkpoint's state dict into it afterwards)."""
    return DSATransformer(args).init_weights().to(device=device, dtype=dtype)
