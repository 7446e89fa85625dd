"""Networks and what defines them: FCDM (and DiT for comparison), their layers, the autoencoders and latent
spaces they work in, and checkpoints.

`create_model(name, **overrides)` builds any registered network: "FCDM-S", "FCDM-B", "FCDM-L", "FCDM-XL"
(Table 1 of the paper: blocks L and width C, per-stage block counts [L, 2L, 4L, 2L, L] and widths C, 2C,
4C, 2C, C), "FCDM-digits" (the CPU demo) and "DiT-S/2" ... "DiT-XL/2". Every constructor argument can be
overridden (e.g. `create_model("FCDM-XL", kernel_size=5)` for the kernel-size ablation).
"""
from models import dit, fcdm  # noqa: F401  (each registers its presets on import)
from models.fcdm import FCDM
from models.registry import MODELS, create_model, register

__all__ = ["MODELS", "create_model", "register", "FCDM"]
