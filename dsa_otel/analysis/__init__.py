"""Offline analysis of dsa-otel runs: KV block locality, working sets and cache what-if (``dsa-otel analyze``)."""
