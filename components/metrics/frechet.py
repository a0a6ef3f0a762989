"""Fréchet distance between two feature sets, via torchmetrics.

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

torchmetrics' FrechetInceptionDistance takes any `nn.Module` as its feature
extractor. The features are computed once by the caller (they also feed the
classifier accuracy and precision/recall), so the module handed to torchmetrics
is an identity that only declares the feature width. The reference set's
statistics are accumulated once and kept (`reset_real_features=False`), so
scoring a new candidate set costs one pass over the candidates.
"""
from __future__ import annotations

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor": the inputs already are (B, num_features) features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def check_features(features: torch.Tensor, name: str, width: int | None = None) -> torch.Tensor:
    """(M, D) finite float features with M >= 2 (a covariance needs two rows), as float64."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (M, D), got {type(features).__name__}")
    if features.dim() != 2 or features.shape[0] < 2 or features.shape[1] < 1:
        raise ValueError(f"{name} must have shape (M, D) with M >= 2, got {tuple(features.shape)}")
    if width is not None and features.shape[1] != width:
        raise ValueError(f"{name} has {features.shape[1]} features, the reference has {width}")
    features = features.detach().to(dtype=torch.float64, device="cpu")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} holds non-finite values")
    return features


class FrechetDistance:
    """FD of candidate feature sets against one fixed reference set.

    reference: (M, D) features of the real data (e.g. the held-out test split).
    Calling with (K, D) candidate features returns the distance as a float.
    """

    def __init__(self, reference: torch.Tensor) -> None:
        reference = check_features(reference, "reference features")
        self.num_features = reference.shape[1]
        self.num_reference = reference.shape[0]
        self._metric = FrechetInceptionDistance(
            feature=PrecomputedFeatures(self.num_features), reset_real_features=False
        )
        self._metric.update(reference, real=True)

    def __call__(self, candidates: torch.Tensor) -> float:
        candidates = check_features(candidates, "candidate features", self.num_features)
        self._metric.reset()  # drops the previous candidates, keeps the reference statistics
        self._metric.update(candidates, real=False)
        return float(self._metric.compute())


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """FD between two (M, D) and (K, D) feature sets (symmetric)."""
    return FrechetDistance(features_a)(features_b)
