"""Top-k / top-p filtering and the seeded draws of VAR's sampler (same semantics and RNG use as the official code).

The random stream is consumed exactly like the reference: one ``multinomial`` over all B·l rows per scale, and
Gumbel noise drawn as −log(Exp(1)) from the same generator, so a given generator state reproduces the reference
indices bit for bit on the same device.
"""

from __future__ import annotations

import torch


def filter_top_k_top_p_(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Mask (in place, with −inf) everything outside the top-k and the top-p nucleus; returns the same tensor.

    top-k keeps every logit ≥ the k-th largest, so ties at the threshold survive. top-p sorts ascending and drops
    entries whose cumulative probability is ≤ 1 − p; the largest entry always survives.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth_Bl1 = logits_BlV.topk(top_k, dim=-1, largest=True, sorted=False)[0].amin(dim=-1, keepdim=True)
        logits_BlV.masked_fill_(logits_BlV < kth_Bl1, -torch.inf)
    if top_p > 0:
        sorted_BlV, order_BlV = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted_BlV = sorted_BlV.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        drop_sorted_BlV[..., -1:] = False
        logits_BlV.masked_fill_(drop_sorted_BlV.scatter(-1, order_BlV, drop_sorted_BlV), -torch.inf)
    return logits_BlV


def sample_top_k_top_p_(
    logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0, rng: torch.Generator | None = None
) -> torch.Tensor:
    """Filter in place, then draw one index per row: (B, l, V) → (B, l)."""
    B, l, V = logits_BlV.shape
    filter_top_k_top_p_(logits_BlV, top_k, top_p)
    probs_NV = logits_BlV.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs_NV, num_samples=1, replacement=True, generator=rng).view(B, l)


def gumbel_softmax(logits: torch.Tensor, tau: float, rng: torch.Generator | None) -> torch.Tensor:
    """Soft Gumbel-softmax with noise from ``rng`` (``torch.nn.functional.gumbel_softmax`` takes no generator)."""
    gumbels = -torch.empty_like(logits).exponential_(generator=rng).log()
    return ((logits + gumbels) / tau).softmax(dim=-1)
