"""collector-config/ is checked structurally (no Collector, Jaeger or Tempo binary installs here): every component
a pipeline names is defined, and ports and service names agree across the collector, Tempo, Grafana and compose."""

import os

import yaml

CFG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "collector-config")


def load(name):
    with open(os.path.join(CFG, name)) as f:
        return yaml.safe_load(f)


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_pipelines_reference_defined_components():
    c = load("otelcol.yaml")
    for ext in c["service"].get("extensions", []):
        assert ext in c["extensions"]
    for name, p in c["service"]["pipelines"].items():
        assert name.split("/")[0] == "traces"
        for kind in ("receivers", "processors", "exporters"):
            for comp in p[kind]:
                assert comp in c[kind], f"{kind[:-1]} {comp} used by pipeline {name} is not defined"
        assert p["processors"].index("memory_limiter") < p["processors"].index("batch")  # limiter first
    assert port_of(c["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]) == 4317
    assert port_of(c["receivers"]["otlp"]["protocols"]["http"]["endpoint"]) == 4318
    assert c["receivers"]["otlp"]["protocols"]["grpc"]["max_recv_msg_size_mib"] >= 16


def test_ports_and_services_agree_with_compose():
    c, tempo, graf, compose = load("otelcol.yaml"), load("tempo.yaml"), load("grafana-datasources.yaml"), \
        load("docker-compose.yaml")
    services = compose["services"]
    col = services["otel-collector"]
    published = {int(p.split(":")[1].split("/")[0]) for p in col["ports"]}
    assert {4317, 4318} <= published
    mount = next(v for v in col["volumes"] if v.startswith("./otelcol.yaml:"))
    assert mount.split(":")[1] in " ".join(col["command"])
    for name, exp in c["exporters"].items():
        if name.startswith("otlp/"):
            host, port = exp["endpoint"].rsplit(":", 1)
            assert host in services, f"exporter {name} points at unknown service {host}"
            if host == "tempo":
                assert int(port) == port_of(tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
            if host == "jaeger":
                assert "COLLECTOR_OTLP_ENABLED=true" in services["jaeger"]["environment"] and int(port) == 4317
    file_dir = os.path.dirname(c["exporters"]["file"]["path"])
    assert any(v.endswith(":" + file_dir) for v in col["volumes"])
    tempo_port = tempo["server"]["http_listen_port"]
    ds = graf["datasources"][0]
    assert ds["type"] == "tempo" and port_of(ds["url"]) == tempo_port
    assert any(int(p.split(":")[1]) == tempo_port for p in services["tempo"]["ports"])
    tmount = next(v for v in services["tempo"]["volumes"] if v.startswith("./tempo.yaml:"))
    assert tmount.split(":")[1] in " ".join(services["tempo"]["command"])
    assert set(col["depends_on"]) <= set(services)


def test_tempo_keeps_dsa_payloads_whole():
    tempo = load("tempo.yaml")
    assert tempo["distributor"]["max_span_attr_byte"] == 0
