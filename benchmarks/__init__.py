"""Benchmarks: speed and quality measurements, written as JSON with machine, torch version and git sha."""
