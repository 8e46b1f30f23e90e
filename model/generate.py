"""Byte-level tokenizer and a batched greedy generation loop over the paged KV cache, with tracing hooks.

The loop prefills each request (one forward per prompt, chunked inside the model), then decodes the batch one
token per step; requests leave the batch when they reach EOS, their token budget or the context limit.
``max_new_tokens <= 0`` means "until EOS or the context limit" (the seed's convention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .dsa import DSATransformer
from .kv import PagedKVCache


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS (256), EOS (257) and PAD (258). Needs no vocabulary file."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (e.g. DeepSeek-V3.2's) through the ``tokenizers`` package; no hub access."""

    def __init__(self, path: str, bos_token: str = "<｜begin▁of▁sentence｜>", eos_token: str = "<｜end▁of▁sentence｜>"):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # optional dependency
            raise ImportError("reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)") from exc
        self.tok = Tokenizer.from_file(path)
        self.bos_id = self.tok.token_to_id(bos_token)
        self.eos_id = self.tok.token_to_id(eos_token)
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(path: str | None = None) -> "ByteTokenizer | HFTokenizer":
    """The byte-level tokenizer by default; a tokenizer.json (file, or a folder holding one) when given."""
    if path is None:
        return ByteTokenizer()
    import os

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return HFTokenizer(path)


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    prompt_lens: list[int]
    steps: int = 0
    finish_reasons: list[str] = field(default_factory=list)


@torch.no_grad()
def generate(model: DSATransformer, cache: PagedKVCache, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             *, request_ids: Sequence[Any] | None = None, tracer: Any = None, eos_id: int | None = None,
             attn: str = "sparse", chunk: int = 128) -> GenerationResult:
    """Greedy decoding of a batch of prompts; every decode step is traced when ``tracer`` is given."""
    args = model.args
    device = cache.device
    rids = list(request_ids) if request_ids is not None else list(range(len(prompts)))
    out = [list(p) for p in prompts]
    reasons = ["" for _ in prompts]
    limit = args.max_seq_len
    for rid, p in zip(rids, prompts):
        if not 0 < len(p) < limit:
            raise ValueError(f"prompt of request {rid!r} has {len(p)} tokens; the model takes 1..{limit - 1}")
        cache.add_sequence(rid)
        cache.reserve(rid, len(p))
        if tracer is not None:
            tracer.start_request(rid, len(p))
    next_tok: dict[Any, int] = {}
    for rid, p in zip(rids, prompts):  # prefill, one request at a time
        table = cache.block_table([rid])
        logits = model(torch.tensor([list(p)], device=device), torch.tensor([0], device=device), cache, table,
                       attn=attn, chunk=chunk, last_only=True)
        cache.advance(rid, len(p))
        next_tok[rid] = int(logits[0, -1].argmax())
        if tracer is not None:
            tracer.end_prefill(rid)
    active = list(range(len(prompts)))
    steps = 0
    while active:
        still = []
        for i in active:
            rid = rids[i]
            out[i].append(next_tok[rid])
            n_new = len(out[i]) - len(prompts[i])
            if eos_id is not None and next_tok[rid] == eos_id:
                reasons[i] = "eos"
            elif 0 < max_new_tokens <= n_new:
                reasons[i] = "length"
            elif len(out[i]) >= limit:
                reasons[i] = "context"
            else:
                still.append(i)
                continue
            cache.free(rid)
            if tracer is not None:
                tracer.end_request(rid, {"dsa.finish_reason": reasons[i], "dsa.generated_tokens": n_new})
        active = still
        if not active:
            break
        batch = [rids[i] for i in active]
        for rid in batch:
            if cache.lengths[rid] + 1 > limit:  # unreachable through the checks above; a guard for RoPE tables
                raise ValueError(f"request {rid!r} would exceed max_seq_len={limit}")
            cache.reserve(rid, 1)
        start = torch.tensor([cache.lengths[r] for r in batch], device=device)
        table = cache.block_table(batch)
        tokens = torch.tensor([[out[i][-1]] for i in active], device=device)
        logits = model(tokens, start, cache, table, attn=attn, chunk=chunk, tracer=tracer, request_ids=batch)
        for rid in batch:
            cache.advance(rid, 1)
        if tracer is not None:
            tracer.end_step()
        for rid, tok in zip(batch, logits[:, -1].argmax(-1).tolist()):
            next_tok[rid] = tok
        steps += 1
    return GenerationResult(tokens=out, prompt_lens=[len(p) for p in prompts], steps=steps, finish_reasons=reasons)
