"""Frozen timm image encoder (e.g. DINOv2 ViT-B/14) returning patch features, weights from disk only.

Weights come from `weights_path` (a .safetensors file or a weights-only torch
state_dict), else from the local Hugging Face hub cache (`cache_dir` or the
default one) with the hub switched offline. Nothing is ever downloaded: a
missing file is an error that says where to put it.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from selfflow.components.pretrained import hub_offline

HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
STATE_DICT_KEYS = ("state_dict", "model", "teacher")  # wrappers used by common training scripts


def _find_in_hub_cache(hub_id: str | None, cache_dir: str | None) -> Path | None:
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache  # local lookup only, no network

    with hub_offline():
        for filename in HUB_FILENAMES:
            found = try_to_load_from_cache(hub_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a weights-only torch file (unwrapping common wrappers)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _create(model_name: str, image_size: int, model_kwargs: dict) -> nn.Module:
    kwargs = {"pretrained": False, "num_classes": 0, **model_kwargs}
    try:
        return timm.create_model(model_name, img_size=image_size, **kwargs)
    except TypeError as error:  # CNNs take no img_size
        if "img_size" not in str(error):
            raise
        return timm.create_model(model_name, **kwargs)


class TimmEncoder(nn.Module):
    """encode_patches(images (B, C, H, W)) -> (B, grid_h * grid_w, feature_dim), frozen, eval mode.

    model_name: any timm architecture, e.g. "vit_base_patch14_dinov2" (DINOv2-B/14).
    weights_path: local weights file; None looks in the hub cache (`cache_dir` or default).
    image_size: the encoder's input resolution; inputs are resized to it (bicubic, antialiased).
    input_range: the value range of incoming images, mapped to [0, 1] before the model's
        mean/std normalisation (the model's pretrained config, unless mean/std are given).
        Single-channel inputs are repeated to three channels.
    model_kwargs: extra keyword arguments for timm.create_model.
    Prefix tokens (class, register) are dropped; CNN feature maps are flattened row-major.
    """

    def __init__(
        self,
        model_name: str,
        weights_path: str | None = None,
        cache_dir: str | None = None,
        image_size: int = 224,
        input_range: tuple[float, float] = (0.0, 1.0),
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        low, high = (float(v) for v in input_range)
        if not high > low:
            raise ValueError(f"input_range must be (low, high) with high > low, got {input_range!r}")
        self.model_name = model_name
        self.image_size = image_size
        self.input_range = (low, high)
        self.model = _create(model_name, image_size, dict(model_kwargs or {}))
        config = getattr(self.model, "pretrained_cfg", {}) or {}
        self.weights_file = self._locate_weights(weights_path, cache_dir, config.get("hf_hub_id"))
        self._load(self.weights_file, config.get("classifier"))

        mean = mean if mean is not None else config.get("mean", (0.5, 0.5, 0.5))
        std = std if std is not None else config.get("std", (0.5, 0.5, 0.5))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.in_channels = len(mean)
        self.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            probe = self.model.forward_features(torch.zeros(1, self.in_channels, image_size, image_size))
        self.grid = self._grid(probe)
        self.feature_dim = int(probe.shape[1] if probe.dim() == 4 else probe.shape[-1])

    # ----- weights ------------------------------------------------------------------------------

    def _locate_weights(self, weights_path: str | None, cache_dir: str | None, hub_id: str | None) -> Path:
        if weights_path is not None:
            path = Path(weights_path).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(
                    f"TimmEncoder: weights file not found: put the weights of {self.model_name!r} "
                    f"(.safetensors or a torch state_dict) at {path}"
                )
            return path
        found = _find_in_hub_cache(hub_id, cache_dir)
        if found is None:
            from huggingface_hub import constants

            cache = Path(cache_dir).expanduser().resolve() if cache_dir else Path(constants.HF_HUB_CACHE)
            raise FileNotFoundError(
                f"TimmEncoder: no local weights for {self.model_name!r}: set weights_path to a .safetensors or "
                f"torch state_dict file, or put the hub snapshot {hub_id or '<no hub id>'} "
                f"({HUB_FILENAMES[0]}) in the cache {cache} (nothing is downloaded)"
            )
        return found

    def _load(self, path: Path, classifier: str | tuple | None) -> None:
        state = read_state_dict(path)
        module = sys.modules.get(type(self.model).__module__)
        filter_fn = getattr(module, "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm's own remapping: original DINOv2 keys, position resampling
            state = filter_fn(state, self.model)
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        own = self.model.state_dict()
        state = {key: value for key, value in state.items()
                 if key in own or not any(key.startswith(f"{head}.") for head in heads)}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"TimmEncoder: {path} lacks {len(missing)} weights of {self.model_name!r}, "
                             f"e.g. {missing[:3]}")
        if unexpected:
            warnings.warn(f"TimmEncoder: ignored {len(unexpected)} unexpected keys of {path}, e.g. {unexpected[:3]}")

    # ----- features -----------------------------------------------------------------------------

    def _grid(self, probe: torch.Tensor) -> tuple[int, int]:
        if probe.dim() == 4:  # CNN map (B, C, H, W)
            return (int(probe.shape[2]), int(probe.shape[3]))
        num_patches = self._patch_tokens(probe).shape[1]
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and grid[0] * grid[1] == num_patches:
            return (int(grid[0]), int(grid[1]))
        side = round(num_patches ** 0.5)
        if side * side != num_patches:
            raise ValueError(f"cannot infer the patch grid of {self.model_name!r} from {num_patches} tokens")
        return (side, side)

    def _patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 4:  # CNN map (B, C, H, W), flattened row-major
            return features.flatten(2).transpose(1, 2)
        return features[:, getattr(self.model, "num_prefix_tokens", 0):]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Maps images in input_range to the model's normalised input at image_size."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        if images.shape[1] == 1 and self.in_channels != 1:
            images = images.expand(-1, self.in_channels, -1, -1)
        if images.shape[1] != self.in_channels:
            raise ValueError(f"{self.model_name!r} takes {self.in_channels} channels, got {images.shape[1]}")
        low, high = self.input_range
        images = (images.float() - low) / (high - low)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        return self._patch_tokens(self.model.forward_features(self.preprocess(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(images)

    def train(self, mode: bool = True) -> "TimmEncoder":
        return super().train(False)  # frozen: always in eval mode
