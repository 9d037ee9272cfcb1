"""Measurement: memory sampling, timers and FLOPs, and the environment record."""
