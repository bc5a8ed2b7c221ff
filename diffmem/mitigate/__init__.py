"""Inference-time mitigations of memorization and their memorization-vs-utility comparison."""
