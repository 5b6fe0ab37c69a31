"""Measuring probes: metrics, evaluation tables, abstention thresholds, the layer sweep, the report."""
