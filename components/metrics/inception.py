"""Inception-v3 features for ImageNet-scale Fréchet distance, from weights on a local path.

Nothing is downloaded: the weights file must already be on disk.
Two flavours, same interface (`features(images)`, `num_features` = 2048):

- "fid": the TF-FID Inception network used by published FID numbers
  (`pt_inception-2015-12-05-6726825d.pth`, as distributed with torch-fidelity),
  run through torchmetrics' `NoTrainInceptionV3`. Needs the torch-fidelity
  package. Use this one for numbers comparable with papers.
- "torchvision": torchvision's ImageNet classifier (`inception_v3_google-0cc3c7bd.pth`).
  No extra package; it also has a 1000-way ImageNet head (`head`), so class
  accuracy of generated samples can be measured. Its FD is NOT comparable with
  published FID (different weights and resizing).
Images come in (B, C, H, W) with values in `data_range`; grey images are repeated to RGB.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FLAVOURS = ("fid", "torchvision")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionFeatures(nn.Module):
    """features(images) -> (B, 2048) pool features of Inception-v3 loaded from `weights_path`."""

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike, flavour: str = "fid",
                 data_range: Sequence[float] = (0.0, 1.0)) -> None:
        super().__init__()
        if flavour not in FLAVOURS:
            raise ValueError(f"Inception flavour must be one of {FLAVOURS}, got {flavour!r}")
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path} (weights are never downloaded: "
                                    f"put the file there, see components/metrics/inception.py)")
        low, high = (float(v) for v in data_range)
        if not high > low:
            raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
        self.flavour, self.data_range = flavour, (low, high)
        self.head: nn.Module | None = None
        if flavour == "fid":
            self.network = _fid_inception(path)
        else:
            self.network, self.head = _torchvision_inception(path)
        self.requires_grad_(False)
        self.eval()

    def _unit_rgb(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features take (B, 1 or 3, H, W) images, got {tuple(images.shape)}")
        low, high = self.data_range
        unit = ((images.float() - low) / (high - low)).clamp(0.0, 1.0)
        return unit.expand(-1, 3, -1, -1) if unit.shape[1] == 1 else unit

    def features(self, images: torch.Tensor) -> torch.Tensor:
        unit = self._unit_rgb(images)
        if self.flavour == "fid":
            # NoTrainInceptionV3 resizes to 299 itself and expects uint8 in [0, 255].
            return self.network((unit * 255).round().to(torch.uint8))
        resized = F.interpolate(unit, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(_IMAGENET_MEAN, device=unit.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=unit.device).view(1, 3, 1, 1)
        return self.network((resized - mean) / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def _fid_inception(path: Path) -> nn.Module:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"Inception flavour 'fid' needs the torch-fidelity package ({error}); "
                                  f"install it or use flavour 'torchvision'") from None


def _torchvision_inception(path: Path) -> tuple[nn.Module, nn.Module]:
    """Inception3 trunk (fc replaced by identity) and its 1000-way fc head."""
    from torchvision.models.inception import Inception3

    network = Inception3(aux_logits=False, init_weights=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not an Inception-v3 state dict")
    # The auxiliary classifier only matters for training; the weights file has it, the trunk does not.
    state = {key: value for key, value in state.items() if not key.startswith("AuxLogits.")}
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match torchvision's Inception-v3 "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head = network.fc
    network.fc = nn.Identity()
    return network, head
