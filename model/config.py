"""ModelArgs of the reference DeepSeek-V3.2 (DSA) model: the official inference config's field names, the Hugging
Face config.json names, and presets.

``tiny`` runs the tests and the demo on two CPU cores in seconds, with top-k (32) smaller than the contexts it
sees so the indexer's selection is real. ``small`` keeps the real attention geometry (MLA 512 + 64 RoPE, indexer
64 heads x 128, top-k 2048) with few, narrow layers so long contexts fit on one H100.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ModelArgs:
    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    vocab_size: int = 129280
    dim: int = 7168
    inter_dim: int = 18432
    moe_inter_dim: int = 2048
    n_layers: int = 61
    n_dense_layers: int = 3
    n_heads: int = 128
    # moe
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 8
    n_expert_groups: int = 8
    n_limited_groups: int = 4
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    route_scale: float = 2.5
    gate_bias: bool = True  # the e_score_correction_bias of the 671B routers
    # mla
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # lightning indexer
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # paged KV cache
    kv_block_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.index_head_dim & (self.index_head_dim - 1):
            raise ValueError("index_head_dim must be a power of two (Hadamard rotation)")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            raise ValueError("qk_rope_head_dim must be even and <= index_head_dim")
        if self.n_routed_experts % self.n_expert_groups or self.n_limited_groups > self.n_expert_groups:
            raise ValueError("experts must split evenly into groups, and limited groups <= groups")
        for name in ("dim", "n_layers", "n_heads", "kv_lora_rank", "q_lora_rank", "index_topk", "kv_block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def replace(self, **kw: Any) -> "ModelArgs":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_json(cls, path_or_dict: str | dict, **overrides: Any) -> "ModelArgs":
        """Load the official inference config (``config_671B_v3.2.json``: ModelArgs names) or a Hugging Face
        ``config.json`` (``hidden_size``, ``num_hidden_layers``, ``rope_scaling``...); unknown keys are ignored."""
        if isinstance(path_or_dict, dict):
            raw = dict(path_or_dict)
        else:
            with open(path_or_dict) as f:
                raw = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        for hf, ours in HF_NAMES.items():
            if hf in raw and ours not in values:
                values[ours] = raw[hf]
        rs = raw.get("rope_scaling") or {}
        for hf, ours in (("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
                         ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("mscale", "mscale")):
            if hf in rs and ours not in values:
                values[ours] = rs[hf]
        if "max_position_embeddings" in raw and "max_seq_len" not in values:
            values["max_seq_len"] = raw["max_position_embeddings"]
        if raw.get("topk_method") == "noaux_tc":
            values.setdefault("gate_bias", True)
        values.update(overrides)
        return cls(**values)


HF_NAMES = {
    "hidden_size": "dim", "intermediate_size": "inter_dim", "moe_intermediate_size": "moe_inter_dim",
    "num_hidden_layers": "n_layers", "first_k_dense_replace": "n_dense_layers", "num_attention_heads": "n_heads",
    "num_experts_per_tok": "n_activated_experts", "n_group": "n_expert_groups", "topk_group": "n_limited_groups",
    "scoring_func": "score_func", "routed_scaling_factor": "route_scale",
}

PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(max_batch_size=8, max_seq_len=2048, vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32,
                      n_layers=3, n_dense_layers=1, n_heads=4, n_routed_experts=8, n_shared_experts=1,
                      n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, q_lora_rank=32,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, original_seq_len=512,
                      rope_factor=4.0, index_n_heads=4, index_head_dim=16, index_topk=32, kv_block_size=16),
    "small": ModelArgs(max_batch_size=32, max_seq_len=163840, vocab_size=32768, dim=1024, inter_dim=2816,
                       moe_inter_dim=512, n_layers=4, n_dense_layers=1, n_heads=16, n_routed_experts=16,
                       n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                       q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                       v_head_dim=128, original_seq_len=4096, rope_factor=40.0, index_n_heads=64,
                       index_head_dim=128, index_topk=2048, kv_block_size=64),
}


def preset(name: str, **overrides: Any) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)} or a config path")
    return PRESETS[name].replace(**overrides)
