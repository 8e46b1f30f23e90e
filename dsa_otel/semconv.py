"""Span names and attribute keys written by dsa-otel (documented in docs/schema.md). One place, so the tracer,
the exporters and the readers cannot disagree."""

SPAN_REQUEST = "dsa.request"
SPAN_PREFILL = "dsa.prefill"
SPAN_DECODE_STEP = "dsa.decode_step"

# resource
RES_RUN_NAME = "dsa.run_name"
RES_RANK = "dsa.rank"
RES_WORLD_SIZE = "dsa.world_size"
RES_KV_BLOCK_SIZE = "dsa.kv_block_size"
RES_DETAIL = "dsa.detail"
RES_DATASET = "dsa.dataset"

# every span of a request
REQUEST_ID = "dsa.request_id"          # int: the JSONL request_id (shard key)
REQUEST_KEY = "dsa.request_key"        # str: the engine's own id when it is not an int
RANK = "dsa.rank"

# dsa.request
PROMPT_LEN = "dsa.prompt_len"
STEPS_TRACED = "dsa.steps_traced"
HOT_PREFIX_BLOCKS = "dsa.prefix.hot_blocks"
HOT_PREFIX_TOUCHES = "dsa.prefix.hot_block_touches"

# dsa.prefill and decode steps (D)
PREFIX_HIT = "dsa.prefix.hit"
PREFIX_CACHED_BLOCKS = "dsa.prefix.cached_blocks"
PREFIX_HIT_TOKENS = "dsa.prefix.hit_tokens"
PREFIX_KEY = "dsa.prefix.key"
PREFIX_PHYSICAL_BLOCKS = "dsa.prefix.physical_block_ids"

# dsa.decode_step
STEP_IDX = "dsa.step"
SEQ_LEN = "dsa.seq_len"
N_LAYERS = "dsa.layers"
BATCH_SIZE = "dsa.batch_size"          # requests in the step (the seed's kv_fetch.*.batch_size)
PHASE = "dsa.phase"                    # "decode" or "prefill"
PAYLOAD = "dsa.step.payload"           # base64 of dsa_otel.v1.StepPayload
PAYLOAD_CHUNKS = "dsa.step.payload_chunks"  # when split: the payload is PAYLOAD + ".0" .. ".<n-1>" concatenated
DETAIL = "dsa.detail"
MEAN_UNIQUE_BLOCKS = "dsa.unique_blocks.mean"
MAX_UNIQUE_BLOCKS = "dsa.unique_blocks.max"
MEAN_TOUCHED_RATIO = "dsa.touched_block_ratio.mean"
MEAN_OFFSET_P50 = "dsa.offset_p50.mean"
KV_BYTES_PREFIX = "dsa.kv_fetch."      # + "<tier>.bytes_read" etc. summed over layers
