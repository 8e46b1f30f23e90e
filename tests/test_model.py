"""Reference DSA model: sparse == dense-then-mask, KV cache correctness, chunked prefill, indexer consistency,
configs, and the tracer hook (A with B) producing records that match the model's own top-k."""

from __future__ import annotations

import json

import pytest
import torch

from dsa_otel import DSATracer, TraceConfig
from dsa_otel.exporters import read_records
from dsa_otel.model.config import ModelArgs, preset
from dsa_otel.model.dsa import build_model, hadamard_rotate
from dsa_otel.model.generate import ByteTokenizer, generate
from dsa_otel.model.kv import OutOfBlocks, PagedKVCache

ARGS = preset("tiny", index_topk=12)  # top-k well below the test contexts: the selection matters


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ARGS)


def run(model, tokens, start=0, cache=None, seq="s", **kw):
    cache = cache or PagedKVCache(ARGS, 64)
    if seq not in cache.tables:
        cache.add_sequence(seq)
    cache.reserve(seq, tokens.shape[1])
    logits = model(tokens, torch.tensor([start]), cache, cache.block_table([seq]), **kw)
    cache.advance(seq, tokens.shape[1])
    return logits, cache


def rand_tokens(n, seed=0):
    return torch.randint(0, ARGS.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def test_sparse_equals_dense_then_mask(model):
    t = rand_tokens(70)
    sparse, _ = run(model, t, attn="sparse")
    dense, _ = run(model, t, attn="dense")
    assert torch.allclose(sparse, dense, atol=1e-4, rtol=1e-4)
    # and in decode, after the cache is filled
    _, c1 = run(model, t, attn="sparse")
    _, c2 = run(model, t, attn="dense")
    nxt = rand_tokens(1, seed=9)
    d1, _ = run(model, nxt, start=70, cache=c1, attn="sparse")
    d2, _ = run(model, nxt, start=70, cache=c2, attn="dense")
    assert torch.allclose(d1, d2, atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_equals_full_forward(model):
    t = rand_tokens(50, seed=1)
    full, _ = run(model, t)
    _, cache = run(model, t[:, :40])
    for i in range(40, 50):  # decode the rest one token at a time through the paged cache
        step, cache = run(model, t[:, i:i + 1], start=i, cache=cache)
        assert torch.allclose(step[0, -1], full[0, i], atol=1e-4, rtol=1e-4), i


def test_chunked_prefill_equals_one_chunk(model):
    t = rand_tokens(90, seed=2)
    a, _ = run(model, t, chunk=1000)
    b, _ = run(model, t, chunk=7)
    assert torch.allclose(a, b, atol=1e-5)


def test_decode_topk_equals_recomputation(model):
    t = rand_tokens(40, seed=3)
    seen = {}

    class Rec:
        enabled = True

        def record_topk(self, layer, topk, seq_lens, rids, block_table=None):
            seen[layer] = topk.clone()

    _, cache = run(model, t[:, :39])
    run(model, t[:, 39:], start=39, cache=cache, tracer=Rec())
    # recompute: the full 40-token forward's last query selects the same positions
    full_sel = {}
    for layer in model.layers:
        orig = layer.attn._topk

        def spy(iq, iw, keys, pos, _orig=orig, _l=layer.attn.layer_id):
            out = _orig(iq, iw, keys, pos)
            full_sel[_l] = out[:, -1].clone()
            return out
        layer.attn._topk = spy
    try:
        run(model, t)
    finally:
        for layer in model.layers:
            del layer.attn._topk
    for layer_id in range(ARGS.n_layers):
        assert sorted(seen[layer_id][0].tolist()) == sorted(full_sel[layer_id][0].tolist())
        assert (seen[layer_id] >= 0).sum() == ARGS.index_topk  # 40 > top-k: a real selection


def test_topk_pads_short_contexts_and_is_causal(model):
    rec = []

    class Rec:
        enabled = True

        def record_topk(self, layer, topk, seq_lens, rids, block_table=None):
            rec.append((topk.clone(), seq_lens.clone()))

    _, cache = run(model, rand_tokens(5))
    run(model, rand_tokens(1, 4), start=5, cache=cache, tracer=Rec())
    for topk, seq in rec:
        valid = topk[topk >= 0]
        assert valid.numel() == 6 and valid.max() <= 5 and int(seq[0]) == 6  # all 6 positions, no future
        assert (topk[0, 6:] == -1).all()


def test_hadamard_is_orthonormal():
    x = torch.randn(5, 16)
    y = hadamard_rotate(x)
    assert torch.allclose(x @ x.T, y @ y.T, atol=1e-5) and not torch.allclose(x, y)


def test_paged_cache_block_tables_and_exhaustion():
    cache = PagedKVCache(ARGS, 4)
    cache.add_sequence("a")
    cache.reserve("a", ARGS.kv_block_size * 2 + 1)
    assert cache.tables["a"] == [0, 1, 2] and cache.allocator.num_free == 1
    cache.add_sequence("b")
    with pytest.raises(OutOfBlocks):
        cache.reserve("b", ARGS.kv_block_size * 2)
    cache.free("a")
    assert cache.allocator.num_free == 4 - len(cache.tables["b"])


def test_configs_from_official_and_hf_json(tmp_path):
    official = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8", "scale_fmt": "ue8m0",
                "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048}
    p = tmp_path / "config_671B_v3.2.json"
    p.write_text(json.dumps(official))
    a = ModelArgs.from_json(str(p))
    assert (a.dim, a.n_layers, a.n_dense_layers, a.index_topk, a.route_scale) == (7168, 61, 3, 2048, 2.5)
    hf = {"hidden_size": 7168, "num_hidden_layers": 61, "first_k_dense_replace": 3, "num_attention_heads": 128,
          "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
          "rope_scaling": {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
                           "mscale": 1.0}, "max_position_embeddings": 163840, "topk_method": "noaux_tc",
          "index_topk": 2048, "vocab_size": 129280}
    b = ModelArgs.from_json(hf)
    assert (b.dim, b.n_heads, b.n_activated_experts, b.rope_factor, b.max_seq_len) == (7168, 128, 8, 40, 163840)
    with pytest.raises(ValueError):
        ModelArgs.from_json({"index_head_dim": 96})  # not a power of two
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_random_init_is_deterministic():
    a, b = build_model(ARGS), build_model(ARGS)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_batched_generation_equals_one_by_one(model):
    tok = ByteTokenizer()
    prompts = [tok.encode("sparse attention " * 3), tok.encode("kv cache"), tok.encode("deepseek v3.2 " * 4)]
    batched = generate(model, PagedKVCache(ARGS, 128), prompts, 6)
    for i, p in enumerate(prompts):
        alone = generate(model, PagedKVCache(ARGS, 128), [p], 6)
        assert alone.tokens[0] == batched.tokens[i]
    assert batched.finish_reasons == ["length"] * 3


def test_tracing_the_model_records_its_own_selections(model, tmp_path):
    tok = ByteTokenizer()
    prompts = [tok.encode("a" * 30), tok.encode("b" * 45)]
    captured = []

    cfg = TraceConfig(out_dir=str(tmp_path), run_name="m", detail="full", kv_block_size=ARGS.kv_block_size,
                      ring_slots=64)
    tracer = DSATracer(cfg)
    orig = tracer.record_topk

    def spy(layer_id, topk, seq_lens, rids, step=None, scores=None, block_table=None):
        captured.append((layer_id, topk.clone(), seq_lens.clone(), list(rids), block_table.clone()))
        return orig(layer_id, topk, seq_lens, rids, step, scores, block_table)
    tracer.record_topk = spy
    cache = PagedKVCache(ARGS, 64)
    generate(model, cache, prompts, 5, tracer=tracer, request_ids=[0, 1])
    tracer.shutdown()
    recs = {(r["request_id"], r["step_idx"], r["layer_id"]): r for r in read_records(str(tmp_path / "m"))}
    assert len(recs) == 2 * (5 - 1) * ARGS.n_layers  # first new token comes from prefill; 4 decode steps each
    for layer_id, topk, seq_lens, rids, table in captured:
        for b, rid in enumerate(rids):
            rec = recs[(rid, int(seq_lens[b]) - 1, layer_id)]
            sel = sorted(int(x) for x in topk[b] if x >= 0)
            assert rec["selected_token_pos"] == sel
            blocks = sorted({p // ARGS.kv_block_size for p in sel})
            assert rec["selected_block_ids"] == blocks
            assert rec["physical_block_ids"] == [int(table[b, x]) for x in blocks]
    spans_ok = tracer.tracing_stats()
    assert spans_ok["steps_dropped"] == 0 and spans_ok["requests_ended"] == 2


def test_untraced_model_makes_no_tracer_calls(model):
    class Boom:
        enabled = False

        def record_topk(self, *a, **k):
            raise AssertionError("called")

    run(model, rand_tokens(10))  # tracer=None
    _, cache = run(model, rand_tokens(10))
    run(model, rand_tokens(1), start=10, cache=cache, tracer=Boom())  # disabled tracer: no call either


def test_tokenizers(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from dsa_otel.model.generate import HFTokenizer, load_tokenizer

    byte = load_tokenizer(None)
    assert byte.decode(byte.encode("Déjà vu")) == "Déjà vu" and byte.encode("a")[0] == byte.bos_id
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<｜begin▁of▁sentence｜>",
                                                                  "<｜end▁of▁sentence｜>"])
    tok.train_from_iterator(["sparse attention selects blocks", "the kv cache holds blocks"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path))
    assert isinstance(hf, HFTokenizer) and hf.bos_id == 1 and hf.eos_id == 2
    ids = hf.encode("sparse attention")
    assert ids[0] == 1 and hf.decode(ids) == "sparse attention"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_moe_dense_and_sparse_routing_agree(model):
    moe = next(layer.ffn for layer in model.layers if hasattr(layer.ffn, "gate"))
    x = torch.randn(10, ARGS.dim)
    w, idx = moe.gate(x)
    assert torch.allclose(moe._routed_dense(x, w, idx), moe._routed_sparse(x, w, idx), atol=1e-5)


def test_prefill_tracing_records_each_chunks_last_query_as_decode_would(model, tmp_path):
    """trace_prefill: every prefill chunk's last query is traced as a phase="prefill" step, with exactly the
    selection that decoding that token would make; analysis keeps these records out of the decode statistics."""
    from dsa_otel.analysis.run import AnalysisConfig, analyze_run, summarize

    tokens = rand_tokens(40, seed=3)
    cfg = TraceConfig(out_dir=str(tmp_path), run_name="p", detail="full", kv_block_size=ARGS.kv_block_size,
                      trace_prefill=True, ring_slots=64)
    tracer = DSATracer(cfg)
    tracer.start_request(0, 40)
    run(model, tokens, tracer=tracer, request_ids=[0], chunk=16)  # chunks end at positions 15, 31, 39
    tracer.end_prefill(0)
    tracer.end_request(0)
    ends = (15, 31, 39)
    for i, p in enumerate(ends):  # reference: prefill tokens[:p] untraced, then decode token p traced
        rid = 10 + i
        _, cache = run(model, tokens[:, :p], seq=rid)
        tracer.start_request(rid, p)
        run(model, tokens[:, p:p + 1], start=p, cache=cache, seq=rid, tracer=tracer, request_ids=[rid])
        tracer.end_step()
        tracer.end_request(rid)
    tracer.shutdown()
    recs = list(read_records(str(tmp_path / "p")))
    prefill = {(r["step_idx"], r["layer_id"]): r for r in recs if r["request_id"] == 0}
    assert sorted(prefill) == [(p, layer) for p in ends for layer in range(ARGS.n_layers)]
    assert all(r["phase"] == "prefill" for r in prefill.values())
    for i, p in enumerate(ends):
        for layer in range(ARGS.n_layers):
            dec = next(r for r in recs if r["request_id"] == 10 + i and r["layer_id"] == layer)
            assert dec["phase"] == "decode" and dec["step_idx"] == p
            assert prefill[(p, layer)]["seq_len_current"] == p + 1
            assert prefill[(p, layer)]["selected_token_pos"] == dec["selected_token_pos"]
    summary = summarize(analyze_run(str(tmp_path / "p"), AnalysisConfig(progress=False)),
                        AnalysisConfig(progress=False))
    assert summary["prefill_records"] == 3 * ARGS.n_layers and summary["records"] == 3 * ARGS.n_layers


def test_context_gathers_whole_blocks_like_slot_indexing():
    """cache.context (block-at-a-time gather, what the indexer reads each step) returns exactly the rows that
    per-token slot indexing returns, for interleaved, non-contiguous block tables of different lengths."""
    cache = PagedKVCache(ARGS, 16)
    bs = ARGS.kv_block_size
    cache.index_k.copy_(torch.randn(cache.index_k.shape))
    for s in ("a", "b", "c"):
        cache.add_sequence(s)
    for _ in range(3):  # interleave allocations so each table is scattered over the pool
        for s, n in (("a", bs), ("b", bs // 2), ("c", bs)):
            cache.reserve(s, n)
            cache.advance(s, n)
    lengths = {s: cache.lengths[s] for s in ("a", "b", "c")}
    table = cache.block_table(["a", "b", "c"])
    T = max(lengths.values())
    got = cache.context(cache.index_k[1], table, T)
    pos = torch.arange(T).view(1, -1).expand(3, T)
    want = cache.index_k[1][cache.slots(table, pos)]
    assert got.shape == (3, T, ARGS.index_head_dim)
    for row, s in enumerate(("a", "b", "c")):
        assert torch.equal(got[row, :lengths[s]], want[row, :lengths[s]])
    assert int(table[0, 1] - table[0, 0]) != 1  # the blocks of a sequence really are scattered


def test_indexer_scores_match_the_formula_in_every_head_grouping(model, monkeypatch):
    """index_score = sum_h w_h * relu(q_h . k): the grouped computation (a small score budget forces one head per
    group, as long prefill chunks do) equals the all-heads-at-once one and the formula written out."""
    ix = model.layers[0].attn.indexer
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, ix.n_heads, ix.head_dim, generator=g)
    w = torch.randn(2, 3, ix.n_heads, generator=g)
    k = torch.randn(2, 20, ix.head_dim, generator=g)
    formula = torch.einsum("bsh,bsht->bst", w, torch.einsum("bshd,btd->bsht", q, k).relu())
    assert torch.allclose(ix.scores(q, w, k), formula, atol=1e-5)
    monkeypatch.setattr(type(ix), "SCORE_BUDGET_BYTES", 2 * 3 * 20 * 4)
    assert torch.allclose(ix.scores(q, w, k), formula, atol=1e-5)


def test_fixed_context_len_decodes_like_the_measured_one(model):
    """context_len (static shapes for CUDA graphs): scoring the whole block table's positions, with shorter
    sequences masked, gives the same selections and logits as scoring exactly the longest sequence."""
    cache = PagedKVCache(ARGS, 32)
    lengths = {"a": 37, "b": 20}
    for s, n in lengths.items():
        cache.add_sequence(s)
        cache.reserve(s, n + 1)
        model(rand_tokens(n, seed=n), torch.tensor([0]), cache, cache.block_table([s]))
        cache.advance(s, n)
    table = cache.block_table(["a", "b"], width=5)  # 5 blocks of 16: 80 positions, more than either needs
    tok = torch.cat([rand_tokens(1, seed=7), rand_tokens(1, seed=8)])
    start = torch.tensor([37, 20])
    seen: dict[str, list[torch.Tensor]] = {"measured": [], "fixed": []}

    def recorder(key):
        class Rec:
            enabled = True

            def record_topk(self, layer, topk, seq_lens, rids, block_table=None):
                seen[key].append(topk.clone())
        return Rec()

    a = model(tok, start, cache, table, tracer=recorder("measured"))
    b = model(tok, start, cache, table, tracer=recorder("fixed"), context_len=80)
    assert torch.allclose(a, b, atol=1e-5)
    for x, y in zip(seen["measured"], seen["fixed"]):
        for row in range(2):
            assert sorted(x[row].tolist()) == sorted(y[row].tolist())
            assert int(x[row].max()) <= int(start[row])  # causal: nothing past each sequence's own token
    with pytest.raises(ValueError, match="context_len"):
        model(tok, start, cache, table, context_len=81)
