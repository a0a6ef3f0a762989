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


def frechet_distance_infinity(distance: FrechetDistance, candidates: torch.Tensor, generator: torch.Generator,
                              num_sizes: int = 10, smallest_fraction: float = 0.25) -> tuple[float, float]:
    """(FD_inf, slope): the FD of infinitely many candidates, extrapolated (Chong & Forsyth, 2020).

    FD of K candidates is biased upward by about slope / K, and the slope depends on the candidates'
    own covariance, so two samplers compared at a small K can swap order. The FD of random subsets
    (drawn from `generator`) of `num_sizes` sizes, evenly spaced in 1 / K between smallest_fraction * M
    and all M candidates, is fitted by least squares as FD(K) = FD_inf + slope / K. The reference set
    stays whole: its own finite-sample bias is the same for every candidate set.
    Written here because torchmetrics has no FD extrapolation.
    """
    candidates = check_features(candidates, "candidate features", distance.num_features)
    total = candidates.shape[0]
    if num_sizes < 2 or not 0.0 < smallest_fraction < 1.0:
        raise ValueError(f"need num_sizes >= 2 and 0 < smallest_fraction < 1, got {num_sizes}, {smallest_fraction}")
    smallest = max(2, int(round(smallest_fraction * total)))
    inverse = torch.linspace(1.0 / smallest, 1.0 / total, num_sizes, dtype=torch.float64)
    sizes = sorted({int(round(1.0 / value)) for value in inverse.tolist()})
    if len(sizes) < 2:
        raise ValueError(f"{total} candidates are too few to extrapolate the FD")
    values = []
    for size in sizes:
        subset = torch.randperm(total, generator=generator)[:size] if size < total else torch.arange(total)
        values.append(distance(candidates[subset]))
    design = torch.stack([torch.ones(len(sizes), dtype=torch.float64),
                          1.0 / torch.tensor(sizes, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, torch.tensor(values, dtype=torch.float64)[:, None]).solution
    return float(solution[0, 0]), float(solution[1, 0])
