"""The compact payload schema (dsa_trace.proto) and its generated module (importable as ``dsa_otel.proto``).

The runtime encodes and decodes payloads with dsa_otel.wire (numpy, no generated code); ``dsa_trace_pb2`` is for
users who want typed messages and for the tests that prove the two agree. It needs a protobuf runtime at least as
new as the protoc that generated it (see the module header)."""
