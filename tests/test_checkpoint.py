"""Checkpoint conversion from a tiny checkpoint generated here in DeepSeek-V3.2-Exp's Hugging Face layout
(key names, FP8 e4m3 weights with 128x128 block scales, an MTP layer to skip, several shards)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dsa_otel.model.checkpoint import (convert_hf_checkpoint, dequantize_fp8, hf_to_ours, load_converted,
                                       quantize_fp8, split_dim)
from dsa_otel.model.config import preset
from dsa_otel.model.dsa import build_model

ARGS = preset("tiny", index_topk=12, dim=128, q_lora_rank=160)  # >128 so weights span several FP8 blocks

OURS_TO_HF = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn": "self_attn",
              "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wkv_a": "kv_a_proj_with_mqa",
              "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj", "ffn": "mlp", "w1": "gate_proj",
              "w3": "up_proj", "w2": "down_proj"}


def to_hf(name: str) -> str:
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "head.weight":
        return "lm_head.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    parts = name.split(".")
    if parts[-1] == "bias" and parts[-2] == "gate":
        parts[-1] = "e_score_correction_bias"
    in_indexer = "indexer" in parts
    out = [p if (in_indexer and p in ("wq_b",)) else ("q_b_proj" if p == "wq_b" else OURS_TO_HF.get(p, p))
           for p in parts]
    return "model." + ".".join(out)


def make_hf_checkpoint(path, model):
    """Write the model's weights as a DeepSeek-V3.2 HF checkpoint: FP8 projections, 3 shards, MTP layer."""
    tensors, expected = {}, {}
    for name, p in model.named_parameters():
        key = to_hf(name)
        assert hf_to_ours(key) == name, (key, hf_to_ours(key), name)
        if p.dim() == 2 and name.endswith("weight") and "embed" not in name and "head" not in name \
                and "gate.weight" not in name and "weights_proj" not in name:
            q, s = quantize_fp8(p.detach())
            tensors[key], tensors[key[:-len("weight")] + "weight_scale_inv"] = q, s
            expected[name] = dequantize_fp8(q, s, torch.float32)
        else:
            tensors[key] = p.detach().to(torch.bfloat16) if p.dim() == 2 else p.detach().clone()
            expected[name] = tensors[key].float()
    tensors[f"model.layers.{ARGS.n_layers}.self_attn.q_a_proj.weight"] = torch.zeros(4, 4)  # MTP: skipped
    keys = sorted(tensors)
    os.makedirs(path, exist_ok=True)
    for i in range(3):
        part = {k: tensors[k].contiguous() for k in keys[i::3]}
        save_file(part, os.path.join(path, f"model-0000{i + 1}-of-00003.safetensors"))
    hf_cfg = {"hidden_size": ARGS.dim, "num_hidden_layers": ARGS.n_layers, "first_k_dense_replace": ARGS.n_dense_layers,
              "num_attention_heads": ARGS.n_heads, "num_experts_per_tok": ARGS.n_activated_experts,
              "n_group": ARGS.n_expert_groups, "topk_group": ARGS.n_limited_groups, "vocab_size": ARGS.vocab_size,
              "intermediate_size": ARGS.inter_dim, "moe_intermediate_size": ARGS.moe_inter_dim,
              "n_routed_experts": ARGS.n_routed_experts, "n_shared_experts": ARGS.n_shared_experts,
              "q_lora_rank": ARGS.q_lora_rank, "kv_lora_rank": ARGS.kv_lora_rank,
              "qk_nope_head_dim": ARGS.qk_nope_head_dim, "qk_rope_head_dim": ARGS.qk_rope_head_dim,
              "v_head_dim": ARGS.v_head_dim, "index_n_heads": ARGS.index_n_heads, "index_head_dim": ARGS.index_head_dim,
              "index_topk": ARGS.index_topk, "max_position_embeddings": ARGS.max_seq_len,
              "rope_scaling": {"factor": ARGS.rope_factor, "original_max_position_embeddings": ARGS.original_seq_len,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0}, "topk_method": "noaux_tc",
              "kv_block_size": ARGS.kv_block_size, "routed_scaling_factor": ARGS.route_scale}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    return expected


def test_fp8_block_dequantisation_matches_blocks():
    w = torch.randn(300, 200)
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    d = dequantize_fp8(q, s, torch.float32)
    for bo in range(3):
        for bi in range(2):
            blk = (slice(bo * 128, (bo + 1) * 128), slice(bi * 128, (bi + 1) * 128))
            assert torch.equal(d[blk], q[blk].float() * s[bo, bi])
    assert (d - w).abs().max() <= w.abs().max() * 0.07  # e4m3 keeps ~2 significant digits


def test_convert_and_load_tp1_and_tp2(tmp_path):
    ref = build_model(ARGS)
    expected = make_hf_checkpoint(str(tmp_path / "hf"), ref)
    args = convert_hf_checkpoint(str(tmp_path / "hf"), str(tmp_path / "tp1"), 1, dtype=torch.float32)
    assert (args.dim, args.n_layers, args.index_topk, args.gate_bias) == (ARGS.dim, ARGS.n_layers, 12, True)
    m = build_model(args)
    load_converted(m, str(tmp_path / "tp1"))
    for name, p in m.named_parameters():
        assert torch.equal(p.detach().float(), expected[name]), name  # exactly the dequantised values
    # TP=2 shards: split dims concatenate back to TP=1, experts live on their owner only
    convert_hf_checkpoint(str(tmp_path / "hf"), str(tmp_path / "tp2"), 2, dtype=torch.float32, args=args)
    from safetensors.torch import load_file

    r0 = load_file(str(tmp_path / "tp2" / "model0-mp2.safetensors"))
    r1 = load_file(str(tmp_path / "tp2" / "model1-mp2.safetensors"))
    for name, full in expected.items():
        d = split_dim(name)
        if ".experts." in name:
            e = int(name.split(".experts.")[1].split(".")[0])
            owner, other = (r0, r1) if e < ARGS.n_routed_experts // 2 else (r1, r0)
            assert torch.equal(owner[name], full) and name not in other
        elif d is None:
            assert torch.equal(r0[name], full) and torch.equal(r1[name], full)
        else:
            assert torch.equal(torch.cat([r0[name], r1[name]], d), full), name
    assert not any(k.startswith(f"layers.{ARGS.n_layers}.") for k in r0)  # MTP layer skipped


def test_converted_checkpoint_runs_under_tp2(tmp_path):
    from test_tp import run_tp

    ref = build_model(preset("tiny", index_topk=12))
    global ARGS
    saved = ARGS
    ARGS = preset("tiny", index_topk=12)
    try:
        make_hf_checkpoint(str(tmp_path / "hf"), ref)
    finally:
        ARGS = saved
    convert_hf_checkpoint(str(tmp_path / "hf"), str(tmp_path / "tp2"), 2, dtype=torch.float32)
    convert_hf_checkpoint(str(tmp_path / "hf"), str(tmp_path / "tp1"), 1, dtype=torch.float32)
    one = run_tp(1, str(tmp_path / "o1"), str(tmp_path / "tp1"))[0]
    two = run_tp(2, str(tmp_path / "o2"), str(tmp_path / "tp2"))
    assert all(torch.allclose(r["logits"], one["logits"], atol=1e-4, rtol=1e-4) for r in two)


def test_missing_scale_and_mismatched_checkpoint_are_clear_errors(tmp_path):
    q, _ = quantize_fp8(torch.randn(8, 8))
    os.makedirs(tmp_path / "bad")
    save_file({"model.layers.0.self_attn.q_a_proj.weight": q}, str(tmp_path / "bad" / "m.safetensors"))
    with pytest.raises(ValueError, match="weight_scale_inv"):
        convert_hf_checkpoint(str(tmp_path / "bad"), str(tmp_path / "out"), 1, args=ARGS)
    with pytest.raises(FileNotFoundError):
        convert_hf_checkpoint(str(tmp_path / "nothing"), str(tmp_path / "out"), 1, args=ARGS)
