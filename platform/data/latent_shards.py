"""Pre-encode a shard set with an autoencoder tokenizer: waveform (or image) shards -> latent shards.

`selfflow data encode --source data/spoken_digits_24k --tokenizer-gin tokenizers/encodec_24khz.gin
--out data/spoken_digits_24k_encodec` runs the preset's `autoencoder.tokenizer.encode_latents` over
every split of the source, in batches, and writes the raw (unnormalised) latents as shards with the
same keys, labels and per-sample metadata. The index metadata records the source and the tokenizer.
Training then reads latents and normalises them with statistics measured on the latent shards
(`latent_tokenizer_from_shards`), so the expensive encoder runs once, not every step.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from selfflow.platform.data.loader import _ShardReader, read_index
from selfflow.platform.data.shards import ARRAY_KEY, LABEL_KEY, write_shards


def _encoded_samples(index, tokenizer: Any, batch_size: int, dtype: np.dtype,
                     progress: Callable[[int, int], None] | None) -> Iterator[dict[str, Any]]:
    pending: list[tuple[str, np.ndarray, int]] = []
    done = 0

    def flush() -> Iterator[dict[str, Any]]:
        nonlocal done
        arrays = torch.from_numpy(np.stack([array for _, array, _ in pending]).astype(np.float32))
        with torch.no_grad():
            latents = tokenizer.encode_latents(arrays).cpu().numpy().astype(dtype)
        for (key, _, label), latent in zip(pending, latents):
            yield {"__key__": key, ARRAY_KEY: latent, LABEL_KEY: int(label)}
        done += len(pending)
        pending.clear()
        if progress is not None:
            progress(done, index.total)

    for key, array, label in _ShardReader(index).samples(index.shard_paths):
        pending.append((key, array, label))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def encode_shard_set(source: str | os.PathLike, tokenizer: Any, out_dir: str | os.PathLike,
                     splits: Sequence[str] = ("train", "test"), batch_size: int = 32, dtype: str = "float32",
                     progress: Callable[[str, int, int], None] | None = None) -> dict[str, Path]:
    """Encode each split of the shard set `source` with `tokenizer.encode_latents` into `out_dir`;
    returns {split: index path}. Shard sizes follow the source's."""
    if not callable(getattr(tokenizer, "encode_latents", None)):
        raise TypeError(f"the tokenizer must have encode_latents(x) -> raw latents, got {type(tokenizer).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    written = {}
    for split in splits:
        index = read_index(source, split)
        per_shard = max(index.counts)
        metadata = {"source": str(source), "source_metadata": index.metadata, "encoded_by": repr(tokenizer),
                    "latents": "raw encoder outputs (unnormalised)"}
        report = (lambda done, total, split=split: progress(split, done, total)) if progress else None
        samples = _encoded_samples(index, tokenizer, batch_size, np.dtype(dtype), report)
        written[split] = write_shards(samples, out_dir, split, per_shard, metadata,
                                      num_classes=index.num_classes)
    return written


def channel_statistics(latents: np.ndarray | torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std of latents (M, C, *positions), over samples and positions."""
    latents = torch.as_tensor(np.asarray(latents), dtype=torch.float64)
    if latents.dim() < 3 or latents.shape[0] * math.prod(latents.shape[2:]) < 2:
        raise ValueError(f"need latents (M, C, *positions) with at least 2 values a channel, got {tuple(latents.shape)}")
    per_channel = latents.transpose(0, 1).reshape(latents.shape[1], -1)
    return {"latent_mean": per_channel.mean(dim=1).tolist(),
            "latent_std": per_channel.std(dim=1).clamp_min(1e-6).tolist()}

