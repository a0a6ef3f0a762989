"""Write samples as a webdataset shard set: `{split}-000000.tar`, ... plus `{split}.index.json`.

Each sample becomes the tar members `<key>.npy` (the array), `<key>.cls` (the
integer label) and optionally `<key>.json` (per-sample metadata) and `<key>.txt`.
The index is the completion marker: everything is written into a hidden temporary
folder inside `out_dir` and moved into place at the end, index last, so a reader
never sees a half-written set that looks complete.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import webdataset as wds

INDEX_FORMAT = "selfflow-shards/1"
ARRAY_KEY = "npy"
LABEL_KEY = "cls"
OPTIONAL_KEYS = ("json", "txt")
# Member extensions a reader may find in a shard; everything else is rejected.
ALLOWED_EXTENSIONS = frozenset({"npy", "cls", "json", "txt", "png", "flac"})
# Extensions whose decoding would run pickle (arbitrary code): always refused.
FORBIDDEN_EXTENSIONS = frozenset({"pkl", "pickle", "pyd", "pth", "pt", "ckpt"})

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # no dots: webdataset splits key and extension at the first dot


def shard_file_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_path_for(folder: str | os.PathLike, split: str) -> Path:
    return Path(folder) / f"{split}.index.json"


@dataclass(frozen=True)
class ShardSetSummary:
    """What was written, for the CLI to print."""

    split: str
    index_path: Path
    shard_paths: tuple[Path, ...]
    counts: tuple[int, ...]
    total: int


def _check_split_name(split: str) -> None:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split name must match {_SPLIT_NAME.pattern}, got {split!r}")


def _encode_npy(array: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


class _SampleEncoder:
    """Checks every sample against the first one and turns it into tar member bytes."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.seen_keys: set[str] = set()

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(sample, Mapping):
            raise TypeError(f"a sample must be a dict, got {type(sample).__name__}")
        key = sample.get("__key__")
        if not isinstance(key, str) or not _SAMPLE_KEY.fullmatch(key):
            raise ValueError(f"sample __key__ must be a non-empty string of [A-Za-z0-9_-], got {key!r}")
        if key in self.seen_keys:
            raise ValueError(f"duplicate sample __key__ {key!r}")
        self.seen_keys.add(key)
        unknown = set(sample) - {"__key__", ARRAY_KEY, LABEL_KEY, *OPTIONAL_KEYS}
        if unknown:
            raise ValueError(f"sample {key!r} has unsupported keys {sorted(unknown)}")
        return {
            "__key__": key,
            ARRAY_KEY: self._encode_array(key, sample.get(ARRAY_KEY)),
            LABEL_KEY: self._encode_label(key, sample.get(LABEL_KEY)),
            **self._encode_optional(key, sample),
        }

    def _encode_array(self, key: str, array: Any) -> bytes:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"sample {key!r}: '{ARRAY_KEY}' must be a numpy array, got {type(array).__name__}")
        if array.dtype.hasobject:
            raise ValueError(f"sample {key!r}: object arrays cannot be stored (they would need pickle)")
        if self.shape is None:
            self.shape, self.dtype = tuple(array.shape), array.dtype
        elif tuple(array.shape) != self.shape or array.dtype != self.dtype:
            raise ValueError(
                f"sample {key!r}: array {tuple(array.shape)} {array.dtype} differs from the first sample's "
                f"{self.shape} {self.dtype}"
            )
        return _encode_npy(array)

    def _encode_label(self, key: str, label: Any) -> bytes:
        if isinstance(label, np.integer):
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int):
            raise TypeError(f"sample {key!r}: '{LABEL_KEY}' must be an int, got {label!r}")
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {key!r}: label {label} outside [0, {self.num_classes})")
        return str(label).encode("ascii")

    @staticmethod
    def _encode_optional(key: str, sample: Mapping[str, Any]) -> dict[str, bytes]:
        encoded = {}
        if "json" in sample:
            try:
                encoded["json"] = json.dumps(sample["json"], sort_keys=True).encode("utf-8")
            except (TypeError, ValueError) as error:
                raise ValueError(f"sample {key!r}: 'json' is not JSON-serialisable ({error})") from None
        if "txt" in sample:
            if not isinstance(sample["txt"], str):
                raise TypeError(f"sample {key!r}: 'txt' must be a str, got {type(sample['txt']).__name__}")
            encoded["txt"] = sample["txt"].encode("utf-8")
        return encoded


class _LocalShardFiles:
    """Opens shard files ourselves: webdataset's gopen refuses local paths when WDS_SECURE=1."""

    def __init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def open(self, file_name: str) -> Any:
        handle = open(file_name, "wb")
        self._handles[file_name] = handle
        return handle

    def close(self, file_name: str) -> None:
        # ShardWriter calls this after closing the tar stream, which leaves our handle open.
        handle = self._handles.pop(file_name)
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()

    def close_all(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _publish(staging: Path, out_dir: Path, split: str, shard_names: list[str], index_name: str) -> None:
    """Move the finished set into out_dir; the old index goes first and the new one last."""
    index_path_for(out_dir, split).unlink(missing_ok=True)
    old_shard = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    for stale in out_dir.iterdir():
        if stale.is_file() and old_shard.fullmatch(stale.name):
            stale.unlink()
    for name in shard_names:
        os.replace(staging / name, out_dir / name)
    os.replace(staging / index_name, out_dir / index_name)


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    split: str,
    samples_per_shard: int,
    metadata: Mapping[str, Any] | None = None,
    *,
    num_classes: int,
) -> Path:
    """Write `samples` as the shard set `split` in `out_dir`; returns the index path.

    Each sample is a dict with "__key__" (unique, no dots), "npy" (array; the same
    shape and dtype for all), "cls" (int in [0, num_classes)) and optionally "json"
    (per-sample metadata) and "txt". Replaces an existing set of the same split.
    """
    _check_split_name(split)
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    metadata = dict(metadata or {})
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata is not JSON-serialisable ({error})") from None

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{split}.partial-", dir=out_dir))
    try:
        encode = _SampleEncoder(num_classes)
        counts: Counter[str] = Counter()
        pattern = str(staging / f"{split}-%06d.tar")
        files = _LocalShardFiles()
        # encoder=False: we hand over bytes we encoded ourselves (never pickle);
        # mtime=0 makes the tar files byte-for-byte reproducible.
        try:
            with wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0,
                                 opener=files.open, post=files.close, encoder=False, mtime=0) as sink:
                for sample in samples:
                    sink.write(encode(sample))
                    counts[Path(sink.fname).name] += 1
        finally:
            files.close_all()
        if not counts:
            raise ValueError(f"no samples given for split {split!r}")

        shard_names = [shard_file_name(split, number) for number in range(len(counts))]
        index = {
            "format": INDEX_FORMAT,
            "split": split,
            "shards": [{"file": name, "count": counts[name]} for name in shard_names],
            "total": sum(counts.values()),
            "array_key": ARRAY_KEY,
            "label_key": LABEL_KEY,
            "shape": list(encode.shape),
            "dtype": encode.dtype.str,
            "num_classes": num_classes,
            "metadata": metadata,
        }
        index_name = index_path_for(out_dir, split).name
        with open(staging / index_name, "w", encoding="utf-8") as handle:
            json.dump(index, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(staging, out_dir, split, shard_names, index_name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index_path_for(out_dir, split)


def summarize_shards(index_path: str | os.PathLike) -> ShardSetSummary:
    """Read back what an index says (no validation of the shards themselves)."""
    index_path = Path(index_path)
    index = json.loads(index_path.read_text(encoding="utf-8"))
    return ShardSetSummary(
        split=index["split"],
        index_path=index_path,
        shard_paths=tuple(index_path.parent / shard["file"] for shard in index["shards"]),
        counts=tuple(int(shard["count"]) for shard in index["shards"]),
        total=int(index["total"]),
    )


def _write_splits(out_dir, shard_counts: Mapping[str, int], make_split, metadata: Mapping[str, Any],
                  num_classes: int) -> dict[str, ShardSetSummary]:
    """Write each split's samples (`make_split(split)` -> (samples, count)) as a shard set. The
    requested shard counts are targets: samples_per_shard = ceil(count / shards)."""
    for split, num_shards in shard_counts.items():  # all checked before anything is written
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"{split}_shards must be a positive int, got {num_shards!r}")
    written = {}
    for split, num_shards in shard_counts.items():
        samples, count = make_split(split)
        index_path = write_shards(samples, out_dir, split, math.ceil(count / num_shards), metadata,
                                  num_classes=num_classes)
        written[split] = summarize_shards(index_path)
    return written


def build_digits_shards(
    out_dir: str | os.PathLike,
    seed: int = 0,
    test_fraction: float = 0.2,
    train_shards: int = 8,
    test_shards: int = 2,
) -> dict[str, ShardSetSummary]:
    """Write the digits train and test splits (seeded, stratified) as shard sets."""
    # Imported here so that `selfflow.platform.data.shards` stays usable without scikit-learn.
    from selfflow.components.datasets.digits import (
        NUM_CLASSES,
        digits_split_indices,
        load_digits_split,
    )

    indices = digits_split_indices(seed, test_fraction)

    def make_split(split: str):
        images, labels = load_digits_split(split, seed, test_fraction)
        samples = (
            {"__key__": f"{int(source):06d}", ARRAY_KEY: image, LABEL_KEY: int(label),
             "json": {"source_index": int(source)}}
            for image, label, source in zip(images, labels, indices[split])
        )
        return samples, len(labels)

    metadata = {"dataset": "sklearn.datasets.load_digits", "seed": seed, "test_fraction": test_fraction,
                "pixel_scale": "raw 0..16 divided by 16"}
    return _write_splits(out_dir, {"train": train_shards, "test": test_shards}, make_split, metadata, NUM_CLASSES)


def build_moving_digits_shards(
    out_dir: str | os.PathLike,
    seed: int = 0,
    test_fraction: float = 0.2,
    clips_per_glyph: int = 2,
    frames: int = 8,
    canvas: int = 16,
    train_shards: int = 8,
    test_shards: int = 2,
) -> dict[str, ShardSetSummary]:
    """Write moving-digits clips (components/datasets/moving_digits.py) as train and test shard sets.

    Each sample's json holds the glyph's `load_digits()` index and its motion (start, velocity).
    """
    from selfflow.components.datasets.digits import digits_split_indices
    from selfflow.components.datasets.moving_digits import NUM_CLASSES, moving_digits_split

    glyph_indices = digits_split_indices(seed, test_fraction)  # the glyphs each split's clips use

    def make_split(split: str):
        clips, labels, motion = moving_digits_split(split, seed, test_fraction, clips_per_glyph, frames, canvas)
        sources = np.repeat(glyph_indices[split], clips_per_glyph)
        samples = (
            {"__key__": f"{int(source):06d}-{n % clips_per_glyph}", ARRAY_KEY: clip, LABEL_KEY: int(label),
             "json": {"source_index": int(source), "start": [int(v) for v in move[:2]],
                      "velocity": [int(v) for v in move[2:]]}}
            for n, (clip, label, source, move) in enumerate(zip(clips, labels, sources, motion))
        )
        return samples, len(labels)

    metadata = {"dataset": "moving digits (sklearn.datasets.load_digits glyphs on bouncing integer-velocity paths)",
                "seed": seed, "test_fraction": test_fraction, "clips_per_glyph": clips_per_glyph, "frames": frames,
                "canvas": canvas, "pixel_scale": "raw 0..16 divided by 16"}
    return _write_splits(out_dir, {"train": train_shards, "test": test_shards}, make_split, metadata, NUM_CLASSES)


def build_spoken_digits_shards(
    out_dir: str | os.PathLike,
    seed: int = 0,
    test_fraction: float = 0.2,
    takes_per_digit: int = 3,
    sample_rate: int = 8000,
    duration: float = 0.64,
    train_shards: int = 8,
    test_shards: int = 2,
    speakers: Sequence[str] | None = None,
) -> dict[str, ShardSetSummary]:
    """Write spoken digits (components/datasets/spoken_digits.py, made with espeak-ng) as train and
    test shard sets of (1, samples) waveforms. Each sample's json holds its speaker, rate and pitch.

    speakers: only these speakers (from either split); None = all 88. Tests build a few.
    """
    from selfflow.components.datasets.spoken_digits import (
        NUM_CLASSES,
        espeak_version,
        speaker_split,
        spoken_digits_split,
    )

    groups = speaker_split(seed, test_fraction)
    if speakers is not None:
        unknown = sorted(set(speakers) - set(groups["train"]) - set(groups["test"]))
        if unknown:
            raise ValueError(f"unknown speakers {unknown}: espeak-ng '<accent>+<variant>' names from SPEAKERS")

    def make_split(split: str):
        chosen = None if speakers is None else tuple(s for s in groups[split] if s in set(speakers))
        if chosen == ():
            raise ValueError(f"none of the speakers {list(speakers)} is in the {split} split {list(groups[split])}")
        clips, labels, info = spoken_digits_split(split, seed, test_fraction, takes_per_digit, sample_rate,
                                                  duration, speakers=chosen)
        samples = (  # clips come speaker by speaker, digit by digit, take by take
            {"__key__": f"{entry['speaker'].replace('+', '_')}-{int(label)}-{n % takes_per_digit}", ARRAY_KEY: clip,
             LABEL_KEY: int(label), "json": dict(entry)}
            for n, (clip, label, entry) in enumerate(zip(clips, labels, info))
        )
        return samples, len(labels)

    metadata = {"dataset": "spoken digits (espeak-ng)", "espeak_version": espeak_version(), "seed": seed,
                "test_fraction": test_fraction, "takes_per_digit": takes_per_digit, "sample_rate": sample_rate,
                "duration": duration, "speakers": None if speakers is None else sorted(speakers),
                "value_scale": "waveform in [-1, 1], peak 0.9"}
    return _write_splits(out_dir, {"train": train_shards, "test": test_shards}, make_split, metadata, NUM_CLASSES)
