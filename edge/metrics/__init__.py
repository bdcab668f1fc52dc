"""Metrics: the Prometheus families edge exports, and their batched updates."""
