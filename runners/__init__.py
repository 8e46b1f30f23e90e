"""Dataset runners (importable as ``dsa_otel.runners``)."""
