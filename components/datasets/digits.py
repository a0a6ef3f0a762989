"""scikit-learn's bundled 8x8 handwritten digits with a fixed, seeded, stratified split.

1,797 real images in 10 classes, shipped inside scikit-learn, so it works offline.
The split is a pure function of (seed, test_fraction): the same arguments always
give the same indices, and the test indices are never part of train.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
SPLITS = ("train", "test")
_MAX_PIXEL = 16.0  # load_digits stores pixel intensities as integers 0..16


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)  # cached: callers receive copies
    labels.setflags(write=False)
    return images, labels


def _check_split_args(seed: int, test_fraction: float) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not isinstance(test_fraction, (float, int)) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def digits_split_indices(seed: int = 0, test_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """Indices into `load_digits()` for each split, e.g. {"train": (1437,), "test": (360,)}.

    Stratified by label, so each split keeps the class proportions of the full set.
    """
    _check_split_args(seed, test_fraction)
    _, labels = _raw_digits()
    train_idx, test_idx = train_test_split(
        np.arange(labels.shape[0]),
        test_size=float(test_fraction),
        random_state=int(seed),
        shuffle=True,
        stratify=labels,
    )
    return {"train": np.asarray(train_idx, dtype=np.int64), "test": np.asarray(test_idx, dtype=np.int64)}


def load_digits_split(
    split: str, seed: int = 0, test_fraction: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """Images float32 (n, 1, 8, 8) in [0, 1] and labels int64 (n,) of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; expected one of {SPLITS}")
    indices = digits_split_indices(seed, test_fraction)[split]
    images, labels = _raw_digits()
    x = (images[indices] / _MAX_PIXEL).astype(np.float32).reshape(-1, *IMAGE_SHAPE)
    y = labels[indices].copy()
    return x, y
