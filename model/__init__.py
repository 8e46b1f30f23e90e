"""Reference DeepSeek-V3.2 DSA model and serving engine (importable as ``dsa_otel.model``)."""
