"""Pre-encode an ImageNet-style image folder into latent shards (`selfflow data images`).

Input: ROOT/<class>/<image> (class folders sorted by name -> labels 0..K-1, images
found recursively, sorted). Each image is center-cropped and resized the way
ADM / DiT / SiT prepare ImageNet (halve with a box filter while the short side is
at least twice the target, bicubic resize of the short side, center crop), turned
to [0, 1], mapped to the tokenizer's `data_range` and encoded in batches with the
tokenizer's `encode_latents` (the autoencoder's raw latents: for SD-VAE the
posterior mean, without the 0.18215 scaling, which the experiment's
LatentTokenizer applies, so the scale stays a knob and never needs re-encoding).

Samples are written in a seeded random order: shards of one class each would
defeat the reader's shuffle buffer. Latents are stored as float16 by default:
half the disk and I/O of float32 (ImageNet-1k: about 10.5 GB instead of 21 GB),
SD-VAE latents (|z| < 100) sit far inside float16's range, and its relative
rounding error (5e-4) is two orders below the VAE's own reconstruction error;
the loader turns them into float32. A latent that overflows float16 is an error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from selfflow.platform.data import DataError
from selfflow.platform.data.shards import ARRAY_KEY, LABEL_KEY, write_shards

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"})
LATENT_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class ImageFolder:
    """An image-classification tree: files, their labels, and the sorted class names."""

    root: Path
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def scan_image_folder(folder: str | os.PathLike) -> ImageFolder:
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders: expected ROOT/<class>/<image> "
                        f"(like ImageNet's train/n01440764/*.JPEG)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(path for path in (root / name).rglob("*")
                       if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in the class folders of {root}")
    return ImageFolder(root, tuple(files), tuple(labels), tuple(classes))


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM's ImageNet preprocessing: box-halve while large, bicubic short side -> size, center crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int, channels: int = 3) -> torch.Tensor:
    """(channels, size, size) float32 in [0, 1]."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB" if channels == 3 else "L")
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read image {path}: {error}") from None
    array = np.asarray(center_crop_resize(image, size), dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0


class _FolderImages(torch.utils.data.Dataset):
    """Images of a folder in a given order (a DataLoader decodes them, in workers if asked)."""

    def __init__(self, folder: ImageFolder, order: Sequence[int], size: int, channels: int) -> None:
        self.folder, self.order, self.size, self.channels = folder, list(order), size, channels

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int, int]:
        source = self.order[position]
        image = load_image(self.folder.files[source], self.size, self.channels)
        return image, self.folder.labels[source], source


def _check_tokenizer(tokenizer: Any, image_size: int | None) -> int:
    for name in ("encode_latents", "latent_shape", "data_range"):
        if not hasattr(tokenizer, name):
            raise TypeError(f"{type(tokenizer).__name__} cannot pre-encode images: it has no {name} "
                            f"(use an autoencoder tokenizer, e.g. tokenizers/sd_vae_ema.gin)")
    own_size = getattr(tokenizer, "image_size", None)
    if image_size is None:
        if own_size is None:
            raise ValueError(f"give image_size: {type(tokenizer).__name__} does not declare one")
        return int(own_size)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if own_size is not None and int(own_size) != image_size:
        raise ValueError(f"image_size {image_size} differs from the tokenizer's image_size {own_size}: "
                         f"set both to the same value")
    return image_size


def encode_image_folder(
    folder: str | os.PathLike,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    split: str = "train",
    image_size: int | None = None,
    shard_size: int = 1000,
    batch_size: int = 32,
    dtype: str = "float16",
    seed: int = 0,
    num_workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Encode every image of `folder` with `tokenizer.encode_latents`; write the shard set `split`.

    Returns the index path. Sample keys are positions in the written order; each
    sample's json member names its source file (relative to the folder).
    `progress(done, total)` is called after every batch.
    """
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(LATENT_DTYPES)}, got {dtype!r}")
    for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    size = _check_tokenizer(tokenizer, image_size)
    images = scan_image_folder(folder)
    order = torch.randperm(len(images.files), generator=torch.Generator().manual_seed(seed)).tolist()
    channels = int(getattr(tokenizer, "image_channels", 3))
    loader = torch.utils.data.DataLoader(_FolderImages(images, order, size, channels), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers)
    low, high = (float(v) for v in tokenizer.data_range)
    storage = LATENT_DTYPES[dtype]
    latent_shape = tuple(tokenizer.latent_shape)

    def samples() -> Iterator[dict[str, Any]]:
        written = 0
        for batch, labels, sources in loader:
            with torch.no_grad():
                latents = tokenizer.encode_latents(batch * (high - low) + low).float().cpu()
            if tuple(latents.shape[1:]) != latent_shape:
                raise DataError(f"tokenizer returned latents of shape {tuple(latents.shape[1:])}, "
                                f"its latent_shape is {latent_shape}")
            stored = latents.numpy().astype(storage)
            if not np.isfinite(stored).all():
                raise DataError(f"non-finite latents (overflow in {dtype}?) in a batch starting at "
                                f"{images.files[int(sources[0])]}: store float32")
            for array, label, source in zip(stored, labels.tolist(), sources.tolist()):
                yield {"__key__": f"{written:09d}", ARRAY_KEY: array, LABEL_KEY: int(label),
                       "json": {"file": images.files[source].relative_to(images.root).as_posix()}}
                written += 1
            if progress is not None:
                progress(written, len(order))

    normalization = getattr(tokenizer, "normalization", None)
    metadata = {
        "dataset": "image folder",
        "folder": str(images.root.resolve()),
        "classes": list(images.classes),
        "image_size": size,
        "crop": "ADM center crop (box halving, bicubic, center)",
        "tokenizer": repr(tokenizer),
        "latents": "raw autoencoder latents (posterior mean), not normalised: the experiment's tokenizer scales them",
        "normalization": normalization.as_dict() if hasattr(normalization, "as_dict") else None,
        "storage_dtype": dtype,
        "order_seed": seed,
    }
    return write_shards(samples(), out_dir, split, shard_size, metadata, num_classes=len(images.classes))
