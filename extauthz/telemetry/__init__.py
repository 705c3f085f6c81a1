"""Metrics (Prometheus) and, later, traces (OpenTelemetry)."""
