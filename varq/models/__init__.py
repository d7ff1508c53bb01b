"""Model families and their weights: VAR and its multi-scale VQ-VAE, checkpoint loading, the digits models.

``from varq.models import build_var, build_vqvae`` is the contract: modules whose ``state_dict`` equals the official
checkpoints' (``var_d16.pth`` …, ``vae_ch160v4096z32.pth``), buffers included.
"""

from varq.models.build import build_var, build_vqvae

__all__ = ["build_var", "build_vqvae"]
