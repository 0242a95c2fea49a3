"""Evaluation of trained GAIR models: geo-alignment benchmark, downstream probes, reports (no Dagster)."""
