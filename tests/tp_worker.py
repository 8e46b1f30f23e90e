"""One tensor-parallel rank (spawned by tests/test_tp.py): builds the tiny model at TP=world, decodes, traces."""

import os
import sys

import torch
import torch.distributed as dist


def main(rank: int, world: int, port: int, out: str, ckpt: str | None) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dsa_otel import DSATracer, TraceConfig
    from dsa_otel.model.checkpoint import load_converted
    from dsa_otel.model.config import preset
    from dsa_otel.model.dsa import build_model
    from dsa_otel.model.generate import ByteTokenizer, generate
    from dsa_otel.model.kv import PagedKVCache

    args = preset("tiny", index_topk=12)
    model = build_model(args)
    if ckpt:
        load_converted(model, ckpt, rank, world)
    tokens = torch.tensor([ByteTokenizer().encode("tensor parallel sparse attention " * 2)])
    cache = PagedKVCache(args, 64)
    cache.add_sequence(0)
    cache.reserve(0, tokens.shape[1])
    logits = model(tokens, torch.tensor([0]), cache, cache.block_table([0]))
    tracer = DSATracer(TraceConfig(out_dir=out, run_name="tp", detail="full", kv_block_size=args.kv_block_size,
                                   rank=rank, world_size=world, ring_slots=64))
    res = generate(model, PagedKVCache(args, 64), [tokens[0].tolist()], 4, tracer=tracer, request_ids=[0])
    tracer.shutdown()
    torch.save({"logits": logits, "tokens": res.tokens[0]}, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else None)
