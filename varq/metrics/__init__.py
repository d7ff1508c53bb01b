"""Metrics: torch-fidelity wrappers (IS, FID, FID2FP16), feature extractors and reference statistics.

Importing this package has no side effects; torch_fidelity is imported lazily, after `ensure_torchvision()`.
"""
