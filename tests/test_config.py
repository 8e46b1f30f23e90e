import pytest

from dsa_otel import ConfigError, TraceConfig


def test_defaults_match_the_seed():
    c = TraceConfig()
    assert (c.kv_block_size, c.max_requests_per_file, c.detail, c.exporters) == (64, 4, "blocks", "jsonl")
    assert c.run_dir.endswith("outputs/run/block64")


def test_env_overrides_and_precedence():
    env = {"DSA_OTEL_KV_BLOCK_SIZE": "128", "DS_TRACE_KV_BLOCK_SIZE": "32", "DS_TRACE_RUN_NAME": "seedrun",
           "DSA_OTEL_DETAIL": "full", "DSA_OTEL_SAMPLE_RATE": "0.25", "DSA_OTEL_STORE_SCORES": "yes"}
    c = TraceConfig.from_env(env, kv_block_size=16, run_name="code")
    assert c.kv_block_size == 128          # DSA_OTEL_ wins over DS_TRACE_ and over code
    assert c.run_name == "seedrun"         # DS_TRACE_ alias wins over code
    assert c.detail == "full" and c.sample_rate == 0.25 and c.store_scores is True


def test_seed_switches_map_to_detail_levels():
    assert TraceConfig.from_env({"DS_TRACE_RECORD_BLOCK_IDS": "1"}, detail="summary").detail == "blocks"
    assert TraceConfig.from_env({"DS_TRACE_RECORD_TOKEN_POS": "1"}).detail == "full"
    assert TraceConfig.from_env({"DS_TRACE_DIR": "/tmp/x"}).out_dir == "/tmp/x"


def test_standard_otlp_variables_are_honoured():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer x"}
    c = TraceConfig.from_env(env)
    assert c.otlp_endpoint == "http://collector:4317" and c.otlp_protocol == "http/protobuf"
    assert c.to_json()["otlp_headers"] == "<redacted>"
    assert TraceConfig.from_env({**env, "DSA_OTEL_OTLP_ENDPOINT": "http://mine:4317"}).otlp_endpoint == "http://mine:4317"


@pytest.mark.parametrize("env, needle", [
    ({"DSA_OTEL_KV_BLOCK_SIZE": "-64"}, "kv_block_size"),
    ({"DSA_OTEL_KV_BLOCK_SIZE": "abc"}, "DSA_OTEL_KV_BLOCK_SIZE"),
    ({"DS_TRACE_KV_BLOCK_SIZE": "1.5"}, "DS_TRACE_KV_BLOCK_SIZE"),
    ({"DSA_OTEL_DETAIL": "everything"}, "detail"),
    ({"DSA_OTEL_SAMPLE_RATE": "2"}, "sample_rate"),
    ({"DSA_OTEL_SAMPLE_RATE": "half"}, "DSA_OTEL_SAMPLE_RATE"),
    ({"DSA_OTEL_ENABLED": "maybe"}, "DSA_OTEL_ENABLED"),
    ({"DSA_OTEL_EXPORTERS": "kafka"}, "exporters"),
    ({"DSA_OTEL_OTLP_PROTOCOL": "udp"}, "otlp_protocol"),
    ({"DSA_OTEL_MAX_REQUESTS_PER_FILE": "0"}, "max_requests_per_file"),
    ({"DSA_OTEL_RANK": "2", "DSA_OTEL_WORLD_SIZE": "2"}, "rank"),
])
def test_bad_values_name_the_variable(env, needle):
    with pytest.raises(ConfigError) as e:
        TraceConfig.from_env(env)
    assert needle in str(e.value)


def test_config_is_frozen_and_replace_validates():
    c = TraceConfig()
    with pytest.raises(Exception):
        c.kv_block_size = 3  # type: ignore[misc]
    with pytest.raises(ConfigError):
        c.replace(kv_block_size=0)


def test_multi_rank_layout():
    c = TraceConfig(out_dir="o", run_name="r", world_size=2, rank=1)
    assert c.run_dir == "o/r/block64/rank1"
