"""Benchmark datasets and detection-quality runs (not installed with the package)."""
