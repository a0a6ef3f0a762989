"""The data an evaluation compares against: both splits as tensors, in the space of generated samples."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from selfflow.platform.errors import ConfigError


@dataclass
class EvalData:
    """Both splits as tensors, plus what identifies them.

    *_x: the data as stored (what the tokenizer encodes); *_images: what the evaluator sees,
    in the space of generated samples: the data itself when it is stored as images (pixel
    and autoencoder tokenizers: FD is then measured against real images), decoder
    reconstructions decode(encode(x)) when the shards hold latents.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_images: torch.Tensor
    test_images: torch.Tensor
    num_classes: int
    data_range: tuple[float, float]
    fingerprint: dict[str, str]


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_eval_data(experiment) -> EvalData:
    data = experiment.data
    if not callable(getattr(data, "arrays", None)):
        raise ConfigError(f"evaluation needs data with arrays(split); {type(data).__name__} has none")
    train_split = getattr(data, "train_split", "train")
    test_split = getattr(data, "eval_split", "test")
    train_x, train_y = data.arrays(train_split)
    test_x, test_y = data.arrays(test_split)
    fingerprint = {"train_arrays": _digest(train_x, train_y), "test_arrays": _digest(test_x, test_y)}
    index_digest = getattr(data, "index_digest", None)  # what identifies stored shards (ShardData)
    if callable(index_digest):
        for split in (train_split, test_split):
            digest = index_digest(split)
            if digest:
                fingerprint[f"{split}_index"] = digest
    num_classes = int(getattr(data, "num_classes", 0)) or int(max(train_y.max(), test_y.max()) + 1)
    low, high = (float(v) for v in getattr(experiment.tokenizer, "data_range", (0.0, 1.0)))
    train_x = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    test_x = torch.from_numpy(np.asarray(test_x, dtype=np.float32))
    stored_as_images = stores_images(experiment.tokenizer, test_x)
    if not stored_as_images:
        fingerprint["images"] = f"decoded by {experiment.tokenizer!r}"

    def images(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(low, high) if stored_as_images else as_images(experiment.tokenizer, x, (low, high))

    return EvalData(
        train_x=train_x,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        train_images=images(train_x),
        test_images=images(test_x),
        num_classes=num_classes,
        data_range=(low, high),
        fingerprint=fingerprint,
    )


@torch.no_grad()
def stores_images(tokenizer, data: torch.Tensor) -> bool:
    """True when decoded samples have the stored data's shape (the shards hold images, not latents)."""
    return tuple(tokenizer.decode(tokenizer.encode(data[:1])).shape) == tuple(data[:1].shape)


@torch.no_grad()
def as_images(tokenizer, data: torch.Tensor, data_range: tuple[float, float], batch_size: int = 512) -> torch.Tensor:
    """decode(encode(data)) clamped to the data range: real data in the space of generated samples."""
    parts = [tokenizer.decode(tokenizer.encode(data[start:start + batch_size])).float()
             for start in range(0, data.shape[0], batch_size)]
    return torch.cat(parts).clamp(*data_range)


def generation_labels(test_labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` labels with the test split's class frequencies: a fixed permutation of the
    test labels, repeated (count = test size gives exactly the test split's classes)."""
    order = torch.randperm(test_labels.shape[0], generator=torch.Generator().manual_seed(seed))
    repeats = -(-count // test_labels.shape[0])
    return test_labels[order].repeat(repeats)[:count]


def fixed_subset(count: int | None, total: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of size min(count, total) (all of them, in order, if count is None)."""
    if count is None or count >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


