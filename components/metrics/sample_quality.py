"""Per-sample quality measures on evaluator outputs.

- class_accuracy: does a sample generated for class c look like c to the evaluator?
- knn_precision_recall: Kynkäänniemi et al. (2019) "improved precision and recall":
  each set's support is approximated by balls around its points with the radius
  of their k-th nearest neighbour in the same set. Precision = share of generated
  points inside the real support (fidelity); recall = share of real points inside
  the generated support (coverage). FD mixes both; these separate them.
"""
from __future__ import annotations

import torch


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max class equals the label; logits (M, C), labels (M,)."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0] or labels.numel() == 0:
        raise ValueError(f"need logits (M, C) and labels (M,) with M > 0, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return float((logits.argmax(dim=1) == labels.to(logits.device)).float().mean())


def _kth_neighbour_radius(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each point to its k-th nearest other point of the same set."""
    distances = torch.cdist(points, points)
    # Sorted row starts with the point itself (distance 0): index k is the k-th neighbour.
    return distances.sort(dim=1).values[:, k]


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """(Q,) bool: query lies in at least one ball (centre_j, radius_j)."""
    return (torch.cdist(queries, centres) <= radii.unsqueeze(0)).any(dim=1)


def knn_precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 5) -> dict[str, float]:
    """{"precision", "recall"} of `generated` (K, D) against `real` (M, D) features."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    for name, features in (("real", real), ("generated", generated)):
        if features.dim() != 2 or features.shape[0] <= k:
            raise ValueError(f"{name} features must be (M, D) with M > k={k}, got {tuple(features.shape)}")
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"real has {real.shape[1]} features, generated has {generated.shape[1]}")
    real, generated = real.detach().double(), generated.detach().double()
    precision = _covered(generated, real, _kth_neighbour_radius(real, k)).double().mean()
    recall = _covered(real, generated, _kth_neighbour_radius(generated, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}
