"""Convert a DeepSeek-V3.2-Exp Hugging Face checkpoint into this model's state dicts, one per tensor-parallel rank.

Input: the checkpoint folder (``model-0000N-of-0000M.safetensors`` shards, optional ``model.safetensors.index.json``,
``config.json``). Linear weights are FP8 e4m3 with a float32 ``weight_scale_inv`` per 128x128 block; they are
dequantised (w = w_fp8 * scale of its block) into the target dtype. Keys are renamed to this model's names, the
multi-token-prediction layer (index >= n_layers) is skipped, and tensors are split for N ranks with the same rules
the model uses (``shard_for_rank``). Output: ``model{rank}-mp{N}.safetensors`` plus ``config.json`` (ModelArgs).
Tensors are processed one at a time, so the 671B checkpoint converts without holding it in memory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Iterator

import torch

from .config import ModelArgs

FP8_BLOCK = 128

# HF module name -> ours, applied to the path segment before ".weight"/".bias"
_RENAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn": "attn", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo",
    "mlp": "ffn", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2",
}

_COLUMN = re.compile(r"(^embed\.weight$|^head\.weight$|\.attn\.wq_b\.weight$|\.attn\.wkv_b\.weight$|"
                     r"\.ffn\.(shared_experts\.)?w[13]\.weight$)")
_ROW = re.compile(r"(\.attn\.wo\.weight$|\.ffn\.(shared_experts\.)?w2\.weight$)")
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def split_dim(name: str) -> int | None:
    """Which dimension of a parameter is split across tensor-parallel ranks (None: replicated)."""
    if _EXPERT.search(name):
        return None
    if _COLUMN.search(name):
        return 0
    if _ROW.search(name):
        return 1
    return None


def full_shape(name: str, local: tuple[int, ...], world_size: int) -> tuple[int, ...]:
    d = split_dim(name)
    if d is None or world_size == 1:
        return local
    return tuple(s * world_size if i == d else s for i, s in enumerate(local))


def shard_for_rank(name: str, full: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
    d = split_dim(name)
    if d is None or world_size == 1:
        return full
    return full.chunk(world_size, dim=d)[rank].contiguous()


def expert_owner(name: str, n_experts: int, world_size: int) -> int | None:
    m = _EXPERT.search(name)
    if m is None:
        return None
    return int(m.group(1)) // (n_experts // world_size)


def hf_to_ours(key: str) -> str | None:
    """``model.layers.3.self_attn.kv_b_proj.weight`` -> ``layers.3.attn.wkv_b.weight`` (None: not ours)."""
    if key == "lm_head.weight":
        return "head.weight"
    if not key.startswith("model."):
        return None
    key = key[len("model."):]
    if key == "embed_tokens.weight":
        return "embed.weight"
    if key == "norm.weight":
        return "norm.weight"
    parts = key.split(".")
    if parts[-1] == "e_score_correction_bias":
        parts[-1] = "bias"
    return ".".join(_RENAMES.get(p, p) for p in parts)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Block-scaled FP8 (128x128 blocks, float32 scale per block) to ``dtype``."""
    out_f, in_f = weight.shape
    scale = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (weight.float() * scale).to(dtype)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's checkpoints store weights (used to make test checkpoints)."""
    out_f, in_f = weight.shape
    bo, bi = -(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK)
    padded = torch.zeros(bo * FP8_BLOCK, bi * FP8_BLOCK)
    padded[:out_f, :in_f] = weight.float()
    blocks = padded.view(bo, FP8_BLOCK, bi, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(bo * FP8_BLOCK, bi * FP8_BLOCK)
    return q[:out_f, :in_f].contiguous(), scale


def _tensors(hf_dir: str) -> Iterator[tuple[str, str]]:
    """(key, file) of every tensor of the checkpoint."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {hf_dir}")
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                yield k, f


def convert_hf_checkpoint(hf_dir: str, out_dir: str, world_size: int = 1, dtype: torch.dtype = torch.bfloat16,
                          args: ModelArgs | None = None) -> ModelArgs:
    """Write ``model{r}-mp{world_size}.safetensors`` for every rank and ``config.json``; returns the ModelArgs."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if args is None:
        args = ModelArgs.from_json(os.path.join(hf_dir, "config.json"))
    if args.n_routed_experts % world_size or args.n_heads % world_size:
        raise ValueError(f"world_size {world_size} must divide n_heads and n_routed_experts")
    where = dict(_tensors(hf_dir))
    handles: dict[str, object] = {}

    def get(key: str) -> torch.Tensor:
        f = where[key]
        if f not in handles:
            handles[f] = safe_open(f, framework="pt")
        return handles[f].get_tensor(key)  # type: ignore[attr-defined]

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(world_size)]
    for key in sorted(where):
        if key.endswith("weight_scale_inv"):
            continue
        name = hf_to_ours(key)
        if name is None:
            continue
        m = re.match(r"layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= args.n_layers:
            continue  # multi-token prediction layer
        t = get(key)
        if t.dtype == torch.float8_e4m3fn:
            scale_key = key[: -len("weight")] + "weight_scale_inv"
            if scale_key not in where:
                raise ValueError(f"{key} is FP8 but {scale_key} is missing")
            t = dequantize_fp8(t, get(scale_key), dtype)
        elif t.is_floating_point():  # norms and the router bias stay float32, other weights take ``dtype``
            t = t.float() if (name.endswith("norm.weight") or name.endswith(".bias")) else t.to(dtype)
        owner = expert_owner(name, args.n_routed_experts, world_size)
        for r in range(world_size):
            if owner is not None and owner != r:
                continue
            shards[r][name] = shard_for_rank(name, t, world_size, r).contiguous()
    os.makedirs(out_dir, exist_ok=True)
    for r, sd in enumerate(shards):
        save_file(sd, os.path.join(out_dir, f"model{r}-mp{world_size}.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2)
    return args


def load_converted(model: torch.nn.Module, ckpt_dir: str, rank: int = 0, world_size: int = 1) -> None:
    """Load this rank's converted state dict (strict: every parameter must be present)."""
    from safetensors.torch import load_file

    sd = load_file(os.path.join(ckpt_dir, f"model{rank}-mp{world_size}.safetensors"))
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in own.items():
            if tuple(sd[name].shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint {tuple(sd[name].shape)} vs model {tuple(p.shape)}")
            p.copy_(sd[name].to(p.dtype))
