"""Reusable AdaRound reconstruction of a fake-quantized VAR (BRECQ; Shift-and-Sum's reconstruction, methods.md §3.6)."""

from varq.quant.recon.config import ReconConfig
from varq.quant.recon.engine import reconstruct

__all__ = ["ReconConfig", "reconstruct"]
