"""Representation quality of a backbone: layer-wise linear and kNN probes at several noise levels.

For each noise level t the clean tokens are noised on the linear path
(x_t = (1 - t) x0 + t eps, fixed eps from a generator), every block's hidden
states are mean-pooled over tokens, and a probe is fitted on the train split
and scored on the test split. A class-conditional backbone gets the NULL class
(`num_classes`): with the true label as input, its label embedding alone would
make every probe trivially perfect.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from selfflow.components.core import module_device
from selfflow.components.paths.linear import LinearPath


@torch.no_grad()
def pooled_hidden_states(
    model: nn.Module,
    tokens: torch.Tensor,
    level: float,
    blocks: Sequence[int],
    generator: torch.Generator,
    batch_size: int = 512,
) -> dict[int, torch.Tensor]:
    """block -> (M, D) token-mean of that block's output on x_t at level `level`, on the CPU
    (each batch runs on the model's device; eps is drawn on the generator's)."""
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"noise level must lie in [0, 1], got {level}")
    if not blocks:
        raise ValueError("blocks must name at least one block")
    was_training = model.training
    model.eval()
    path = LinearPath()
    num_classes = int(getattr(model, "num_classes", 0))
    pooled: dict[int, list[torch.Tensor]] = {block: [] for block in blocks}
    last = max(blocks)
    device = module_device(model)
    for start in range(0, tokens.shape[0], batch_size):
        x0 = tokens[start:start + batch_size].to(device).float()
        eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(device)
        t = torch.full((x0.shape[0],), float(level), device=x0.device)
        cond = torch.full((x0.shape[0],), num_classes, dtype=torch.long, device=x0.device) if num_classes else None
        out = model(path.interpolate(x0, eps, t), t, cond, return_layers=tuple(blocks), stop_at=last)
        for block in blocks:
            pooled[block].append(out.hidden[block].float().mean(dim=1).cpu())
    model.train(was_training)
    return {block: torch.cat(parts) for block, parts in pooled.items()}


def _as_numpy(features, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    x = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: need features (M, D) and labels (M,) with M > 0, got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features hold non-finite values")
    return x.astype(np.float64), y.astype(np.int64)


def linear_probe_accuracy(train_features, train_labels, test_features, test_labels,
                          *, regularization: float = 1.0, max_iter: int = 500, seed: int = 0) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = _as_numpy(train_features, train_labels, "probe train split")
    x_test, y_test = _as_numpy(test_features, test_labels, "probe test split")
    if len(np.unique(y_train)) < 2:
        raise ValueError("probe train split has a single class: nothing to separate")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=max_iter, random_state=seed))
    # Problems this small only lose time to BLAS threads (much slower on a busy machine).
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(x_train, y_train)
        return float((probe.predict(x_test) == y_test).mean())


def knn_probe_accuracy(train_features, train_labels, test_features, test_labels, *, k: int = 10) -> float:
    """Test accuracy of a distance-weighted k-nearest-neighbour vote under cosine distance.

    Features are standardised first: a few hidden dimensions of large scale would otherwise
    dominate every cosine.
    """
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = _as_numpy(train_features, train_labels, "probe train split")
    x_test, y_test = _as_numpy(test_features, test_labels, "probe test split")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x_train.shape[0]:
        raise ValueError(f"k must be an int in [1, {x_train.shape[0]}], got {k!r}")
    probe = make_pipeline(StandardScaler(),
                          KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance", algorithm="brute"))
    with threadpool_limits(limits=1, user_api="blas"):
        probe.fit(x_train, y_train)
        return float((probe.predict(x_test) == y_test).mean())


@dataclass
class ProbeResults:
    """Accuracies indexed [block_index, level_index]; rows follow `blocks`, columns `levels`."""

    blocks: list[int]
    levels: list[float]
    linear: np.ndarray
    knn: np.ndarray | None = None

    def best(self, kind: str = "linear") -> tuple[float, int, float]:
        """(accuracy, block, level) of the best cell."""
        table = self.linear if kind == "linear" else self.knn
        row, col = np.unravel_index(int(np.argmax(table)), table.shape)
        return float(table[row, col]), self.blocks[row], self.levels[col]


def probe_backbone(
    model: nn.Module,
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    levels: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    blocks: Sequence[int] | None = None,
    seed: int = 0,
    knn_k: int | None = 10,
    batch_size: int = 512,
) -> ProbeResults:
    """Linear (and kNN) probe accuracy for every block x noise level.

    The noise of level i comes from generators seeded (seed, i) for train and test, so
    repeated evaluations of one model see identical inputs.
    """
    depth = int(getattr(model, "depth", 0))
    blocks = list(blocks) if blocks else list(range(1, depth + 1))
    if not blocks:
        raise ValueError("the model has no `depth` and no blocks were given")
    levels = [float(level) for level in levels]
    linear = np.zeros((len(blocks), len(levels)))
    knn = np.zeros_like(linear) if knn_k else None
    for col, level in enumerate(levels):
        train_gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * col)
        test_gen = torch.Generator().manual_seed(seed * 1_000_003 + 2 * col + 1)
        train = pooled_hidden_states(model, train_tokens, level, blocks, train_gen, batch_size)
        test = pooled_hidden_states(model, test_tokens, level, blocks, test_gen, batch_size)
        for row, block in enumerate(blocks):
            linear[row, col] = linear_probe_accuracy(train[block], train_labels, test[block], test_labels, seed=seed)
            if knn is not None:
                knn[row, col] = knn_probe_accuracy(train[block], train_labels, test[block], test_labels, k=knn_k)
    return ProbeResults(blocks=blocks, levels=levels, linear=linear, knn=knn)
