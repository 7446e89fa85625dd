"""The `torch` feature backend: an Inception-v3 in PyTorch, APPROXIMATE stand-in for ADM's TF graph.

Architecture: torchvision's `inception_v3` with 1008 classes (the class count of the 2015 TF graph)
and no auxiliary head; weights are read from a local file (`--inception-weights`, a state_dict in
.safetensors or torch format, e.g. a conversion of the TF graph such as pytorch-fid's FID weights
with its keys mapped to torchvision names). Nothing is downloaded.

The mapping to ADM's tensors:
- images: uint8 NHWC -> float, bilinearly resized to 299x299, normalised as (x - 128) / 128;
- pool features (FID, precision, recall): the 2048-d global average pool (TF `pool_3`);
- spatial features (sFID): the first 7 channels of `Mixed_6d.branch1x1` (TF `mixed_6/conv`,
  17x17x192), flattened in NHWC order -> 2023;
- Inception Score: softmax(pool @ fc.weight^T), without the bias, as ADM.

Why only approximate: torchvision's Inception blocks differ in details from the 2015 graph (pooling
padding in some blocks, max vs average pooling in the last block), and torch's bilinear resize uses
half-pixel centres where the TF1 graph's ResizeBilinear does not. Numbers are close, not equal;
report the `tf` backend for comparison with papers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file
from torchvision.models import inception_v3

from fcdm_common.cli import UserError

NUM_CLASSES = 1008  # the 2015 Inception graph's softmax size
IMAGE_SIZE = 299
SPATIAL_CHANNELS = 7


def build_inception(num_classes: int = NUM_CLASSES, device=None):
    """torchvision's Inception-v3 skeleton without the aux head (device="meta": no memory, no init cost)."""
    with torch.device(device or "cpu"):
        return inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=num_classes,
                            transform_input=False)


def load_state_dict(path: str) -> Dict[str, "object"]:
    if not Path(path).is_file():
        raise UserError(f"{path}: Inception weights not found (pass --inception-weights PATH)")
    try:
        if str(path).endswith(".safetensors"):
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: cannot read Inception weights ({e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


class TorchInception:
    """`__call__(uint8 (b,H,W,3)) -> dict(pool (b,2048), spatial (b,2023), softmax (b,1008))`."""

    def __init__(self, weights_path: str, device: Optional[str] = None):
        self.torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_inception(device="meta")  # parameters come from the file (assign=True)
        try:
            model.load_state_dict(load_state_dict(weights_path), strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0:3]
            raise UserError(f"{weights_path}: does not match torchvision's inception_v3 with "
                            f"{NUM_CLASSES} classes: {' '.join(first)}") from None
        self.model = model.eval().to(self.device)
        self._captured: Dict[str, "torch.Tensor"] = {}
        model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: self._captured.__setitem__("spatial", o))
        model.avgpool.register_forward_hook(lambda m, i, o: self._captured.__setitem__("pool", o))

    def __call__(self, images: np.ndarray) -> Dict[str, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)  # (b, H, W, 3) uint8
            x = x.permute(0, 3, 1, 2).float()  # (b, 3, H, W), 0..255
            x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
            x = (x - 128.0) / 128.0  # the TF graph's Sub/Mul normalisation
            self.model(x)
            pool = self._captured["pool"].flatten(1).double()  # (b, 2048)
            spatial = self._captured["spatial"][:, :SPATIAL_CHANNELS]  # (b, 7, 17, 17)
            spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # NHWC order, (b, 2023)
            logits = pool @ self.model.fc.weight.double().T  # (b, 1008), no bias as in ADM
            probs = torch.softmax(logits, dim=1)
        return {"pool": pool.float().cpu().numpy(), "spatial": spatial.float().cpu().numpy(),
                "softmax": probs.cpu().numpy()}
