"""Former home of the autoencoder wrapper; everything now lives in fcdm_common/autoencoders.py.

Kept as re-exports so code written against `fcdm_common.vae` keeps working.
"""
from __future__ import annotations

from fcdm_common.autoencoders import (DEFAULT_HF_MODEL, DEFAULT_SCALING_FACTOR, DiffusersAutoencoder, IdentityVAE,
                                      load_autoencoder, load_vae, vae_id)

SDVAE = DiffusersAutoencoder  # the former name of the diffusers wrapper

__all__ = ["DEFAULT_HF_MODEL", "DEFAULT_SCALING_FACTOR", "DiffusersAutoencoder", "IdentityVAE", "SDVAE",
           "load_autoencoder", "load_vae", "vae_id"]
