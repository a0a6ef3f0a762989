"""A safe, deterministic, resumable reader for the shard sets written by `shards.write_shards`.

Safety: every tar member is checked before a byte of it is read: its extension against an
allow-list (pickle/torch members, .pkl .pickle .pyd .pth .pt .ckpt, are refused by name, never
loaded), its type (regular files only: no sparse members, links or devices) and the size its
header claims against a limit: the array member's size follows from the index's shape and dtype
(plus an npy header), any other member gets MEMBER_LIMIT_BYTES, and an index whose shape implies
more than SAMPLE_LIMIT_BYTES per sample is refused. So a tiny shard cannot make the reader
allocate what it claims (webdataset's own tar iterator reads every member whole first). Arrays
are read with numpy's `allow_pickle=False` and must be finite, labels as ASCII ints.
webdataset's own decoders (which include pickle and torch.load) are never used, and shard files
are opened directly (no `pipe:` URLs).

Determinism: epoch e reads the shards in an order drawn from (seed, e) and shuffles
samples with a buffer seeded from (seed, e, slot). A slot is one reader:
slot = rank * W + worker with W = max(1, num_workers); slot s reads the shards
order[s::world_size * W], so ranks and workers read disjoint shards. Every slot emits
the same number of full batches per epoch, K_e = min over slots of
(samples in the slot // batch_size); the rest of a slot's shuffled stream is dropped
(deterministically). So every rank takes W * K_e steps in epoch e and the iterator
never ends: the trainer decides the step count. The same seed gives the same batch
sequence for a fixed worker count; with no dropped remainder (every slot's sample
count a multiple of batch_size) an epoch holds exactly the same samples for any W.

Shuffling within a slot, two ways (`shuffle`):
- 'buffer': webdataset's shuffle buffer over the slot's stream. Resuming regenerates epoch e and
  skips the batches already taken by reading and dropping their samples: O(position), from memory
  for a set small enough to be cached (DECODED_CACHE_BYTES).
- 'blocks': the slot's shards in groups of `block_shards` consecutive shards (in the epoch's shard
  order); each block's samples are permuted together (a seeded permutation of (seed, epoch, slot,
  block)) and the blocks follow each other. A position maps, from the index's per-shard counts
  alone, to (block, offset) per rank and reader: resuming reads that one block, whatever the
  position (O(1) in the epoch's length). The large-data choice (ImageNet latents).
'auto' (ShardData's default) is 'buffer' for sets up to DECODED_CACHE_BYTES, 'blocks' above.
Either way the DataLoader's round-robin over workers is rotated so the next batch is exactly what
an uninterrupted run would give.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import re
import tarfile
from dataclasses import dataclass
from io import BytesIO
from itertools import count, islice
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

os.environ.setdefault("WDS_SECURE", "1")  # belt and braces: we never call webdataset's decoders anyway

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys

from selfflow.platform.data import DataError
from selfflow.platform.data.shards import (
    ALLOWED_EXTENSIONS,
    FORBIDDEN_EXTENSIONS,
    INDEX_FORMAT,
    index_path_for,
)

_SHARD_ORDER_TAG = 0
# Shard sets up to this size keep their decoded samples in memory after the first epoch: small
# sets are otherwise loader-bound (tar + npy parsing per sample; docs/performance.md).
DECODED_CACHE_BYTES = 256 * 2**20
_SAMPLE_SHUFFLE_TAG = 1
_BLOCK_SHUFFLE_TAG = 2
SHUFFLES = ("buffer", "blocks")
# Limits checked against each tar member's header before it is read (see the module docstring).
MEMBER_LIMIT_BYTES = 16 * 2**20  # labels, json, txt, ...: a member the index does not size
SAMPLE_LIMIT_BYTES = 2**30  # the largest array per sample an index may declare
NPY_HEADER_LIMIT_BYTES = 2**16 + 16  # npy format 1.0: a 10-byte preamble and a header of at most 65535 bytes
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (skipped, as it does)
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ShardIndex:
    """A validated `{split}.index.json`."""

    path: Path
    split: str
    shard_paths: tuple[Path, ...]
    counts: tuple[int, ...]
    total: int
    array_key: str
    label_key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    num_classes: int
    metadata: dict[str, Any]


def resolve_index_path(source: str | os.PathLike, split: str | None = None) -> Path:
    """An index file given directly, or `folder/{split}.index.json`."""
    source = Path(source)
    if source.is_dir() or source.suffix != ".json":
        if split is None:
            raise DataError(f"{source} is not an index file (*.json): pass split= to pick a shard set in that folder")
        return index_path_for(source, split)
    if split is not None and source.name != index_path_for(source.parent, split).name:
        raise DataError(f"index {source} does not belong to split {split!r}")
    return source


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _index_field(raw: Mapping[str, Any], name: str, path: Path) -> Any:
    if name not in raw:
        raise DataError(f"shard index {path} lacks the field {name!r}")
    return raw[name]


def read_index(source: str | os.PathLike, split: str | None = None) -> ShardIndex:
    """Load and check an index: format, non-empty, counts add up, every shard file exists."""
    path = resolve_index_path(source, split)
    if not path.is_file():
        raise DataError(f"shard index not found: {path} (the shard set is missing or was not written completely)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read shard index {path}: {error}") from None
    if not isinstance(raw, dict) or raw.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a shard index of format {INDEX_FORMAT!r}")

    shards = _index_field(raw, "shards", path)
    if not isinstance(shards, list) or not shards:
        raise DataError(f"empty shard set: {path} lists no shards")
    names, counts = [], []
    for entry in shards:
        name = entry.get("file") if isinstance(entry, dict) else None
        number = entry.get("count") if isinstance(entry, dict) else None
        # Plain file names only: no folders, no hidden files, no `pipe:`-style URLs.
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") or not name.endswith(".tar"):
            raise DataError(f"shard index {path} has an invalid shard entry {entry!r}")
        if not _positive_int(number):
            raise DataError(f"shard index {path}: shard {name} has an invalid count {number!r}")
        names.append(name)
        counts.append(number)
    total = _index_field(raw, "total", path)
    if total != sum(counts):
        raise DataError(f"shard index {path}: total {total!r} differs from the sum of shard counts {sum(counts)}")
    shard_paths = tuple(path.parent / name for name in names)
    for shard in shard_paths:
        if not shard.is_file():
            raise DataError(f"shard listed in {path} is missing: {shard}")

    array_key, label_key = _index_field(raw, "array_key", path), _index_field(raw, "label_key", path)
    if not isinstance(array_key, str) or array_key.split(".")[-1] != "npy":
        raise DataError(f"shard index {path}: array_key must name an .npy member, got {array_key!r}")
    if not isinstance(label_key, str) or label_key.split(".")[-1] != "cls":
        raise DataError(f"shard index {path}: label_key must name a .cls member, got {label_key!r}")
    shape = _index_field(raw, "shape", path)
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise DataError(f"shard index {path}: invalid shape {shape!r}")
    try:
        dtype = np.dtype(_index_field(raw, "dtype", path))
    except TypeError:
        raise DataError(f"shard index {path}: invalid dtype {raw['dtype']!r}") from None
    if dtype.hasobject:
        raise DataError(f"shard index {path}: object dtype is not allowed")
    sample_bytes = math.prod(shape) * dtype.itemsize
    if sample_bytes > SAMPLE_LIMIT_BYTES:
        raise DataError(f"shard index {path}: shape {tuple(shape)} {dtype} means {sample_bytes} bytes per sample, "
                        f"more than the reader's limit of {SAMPLE_LIMIT_BYTES}")
    num_classes = _index_field(raw, "num_classes", path)
    if not _positive_int(num_classes):
        raise DataError(f"shard index {path}: num_classes must be a positive int, got {num_classes!r}")
    return ShardIndex(
        path=path,
        split=str(raw.get("split", "")),
        shard_paths=shard_paths,
        counts=tuple(counts),
        total=total,
        array_key=array_key,
        label_key=label_key,
        shape=tuple(shape),
        dtype=dtype,
        num_classes=num_classes,
        metadata=dict(raw.get("metadata") or {}),
    )


def check_member_extension(extension: str, key: str, shard: Path) -> None:
    """Refuse pickle/torch members by name and anything not on the allow-list."""
    parts = extension.lower().split(".")
    member = f"{key}.{extension}"
    if FORBIDDEN_EXTENSIONS.intersection(parts):
        raise DataError(f"refusing to decode member {member} in shard {shard}: pickle/torch members can run code")
    if parts[-1] not in ALLOWED_EXTENSIONS:
        raise DataError(
            f"unknown member type {member} in shard {shard}; allowed extensions: {sorted(ALLOWED_EXTENSIONS)}"
        )


def _short_reason(error: BaseException) -> str:
    # webdataset appends " @ <file object>" and stream details to exception args; keep the first part.
    text = str(error.args[0]) if error.args else ""
    return f"{type(error).__name__}: {text.split(' @ ')[0]}".rstrip(": ")


class _ShardReader:
    """Reads shards in a given order and yields validated (key, array, label) samples.

    A shard set of at most DECODED_CACHE_BYTES on disk keeps each fully read shard's decoded
    samples: later epochs replay them instead of parsing tar and npy again (the same samples
    in the same order, so determinism and resuming are unchanged). Larger sets stream.
    """

    def __init__(self, index: ShardIndex) -> None:
        self.index = index
        self.count_of = dict(zip(index.shard_paths, index.counts))
        on_disk = sum(path.stat().st_size for path in index.shard_paths)
        self._decoded: dict[Path, list[tuple[str, np.ndarray, int]]] | None = (
            {} if on_disk <= DECODED_CACHE_BYTES else None
        )

    def samples(self, shard_paths: Sequence[Path]) -> Iterator[tuple[str, np.ndarray, int]]:
        for shard in shard_paths:
            if self._decoded is not None and shard in self._decoded:
                yield from self._decoded[shard]
                continue
            decoded: list[tuple[str, np.ndarray, int]] = []
            seen = 0
            try:
                with open(shard, "rb") as stream:
                    members = self._members(shard, stream)
                    for raw in group_by_keys(members):
                        sample = self._decode(raw, shard)
                        seen += 1
                        if self._decoded is not None:
                            decoded.append(sample)
                        yield sample
            except DataError:
                raise
            except (tarfile.TarError, OSError, EOFError, ValueError) as error:
                raise DataError(f"cannot read shard {shard} (truncated or damaged?): {_short_reason(error)}") from None
            expected = self.count_of[shard]
            if seen != expected:
                raise DataError(
                    f"shard {shard} holds {seen} samples but its index lists {expected} (truncated or rewritten?)"
                )
            if self._decoded is not None:
                self._decoded[shard] = decoded

    def _limit(self, extension: str) -> int:
        index = self.index
        if extension == index.array_key:
            return math.prod(index.shape) * index.dtype.itemsize + NPY_HEADER_LIMIT_BYTES
        return MEMBER_LIMIT_BYTES

    def _members(self, shard: Path, stream) -> Iterator[dict[str, Any]]:
        """{fname, data, __url__} per tar member (what webdataset's group_by_keys takes), each
        member's name, type and claimed size checked before it is read."""
        archive = tarfile.open(fileobj=stream, mode="r|*")
        for member in archive:
            name = member.name
            if _META_MEMBER.match(name) or member.isdir():
                continue
            match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)  # webdataset's key/extension split
            if match is None:
                raise DataError(f"shard {shard}: member {name!r} has no extension")
            key, extension = match.groups()
            check_member_extension(extension, key, shard)
            if not member.isfile() or member.issparse():
                kind = "sparse file" if member.issparse() else "link or special file"
                raise DataError(f"shard {shard}: member {name} is a {kind}; shards hold regular files only")
            limit = self._limit(extension)
            if member.size > limit:
                raise DataError(f"shard {shard}: member {name} claims {member.size} bytes, more than the {limit} its "
                                f"index allows ({self.index.path})")
            data = archive.extractfile(member).read()
            yield {"fname": name, "data": data, "__url__": str(shard)}
            archive.members = []  # streaming: keep no list of every member seen

    def _decode(self, raw: dict[str, Any], shard: Path) -> tuple[str, np.ndarray, int]:
        key = raw["__key__"]
        for extension in raw:
            if not extension.startswith("__"):
                check_member_extension(extension, key, shard)
        index = self.index
        for wanted in (index.array_key, index.label_key):
            if wanted not in raw:
                raise DataError(f"shard {shard}: sample {key} has no .{wanted} member")
        try:
            array = np.lib.format.read_array(BytesIO(raw[index.array_key]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise DataError(
                f"shard {shard}: member {key}.{index.array_key} is not a valid npy array ({error})"
            ) from None
        if array.shape != index.shape or array.dtype != index.dtype:
            raise DataError(
                f"shard {shard}: member {key}.{index.array_key} has shape {array.shape} dtype {array.dtype}; "
                f"the index says {index.shape} {index.dtype}"
            )
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise DataError(f"shard {shard}: member {key}.{index.array_key} holds {bad} non-finite values (NaN/Inf)")
        text = raw[index.label_key]
        try:
            label = int(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"shard {shard}: member {key}.{index.label_key} is not an integer: {text[:20]!r}") from None
        if not 0 <= label < index.num_classes:
            raise DataError(
                f"shard {shard}: member {key}.{index.label_key} has label {label} outside [0, {index.num_classes})"
            )
        return key, array, label


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _collate(samples: list[tuple[str, np.ndarray, int]]) -> Batch:
    _, arrays, labels = zip(*samples)
    return {
        "x": torch.from_numpy(np.stack(arrays)).to(torch.float32),
        "y": torch.tensor(labels, dtype=torch.int64),
    }


def _batches_taken_by(role: int, batch_in_epoch: int, num_readers: int) -> int:
    """How many of the epoch's first `batch_in_epoch` batches came from worker `role` (round-robin)."""
    return max(0, -(-(batch_in_epoch - role) // num_readers))


class ShardDataset(IterableDataset):
    """An infinite, seeded stream of full batches {"x": float32 (B, ...), "y": int64 (B,)} of one shard set.

    `source` is an index file or a folder together with `split`. Iterate it through
    `make_loader`, which tracks the data position; iterating it directly starts at
    epoch 0 (or at the position given to `at`).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        batch_size: int,
        seed: int = 0,
        *,
        split: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        keys: Sequence[str] = ("npy", "cls"),
        shuffle: str = "buffer",
        block_shards: int = 4,
    ) -> None:
        super().__init__()
        if not _positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if not _positive_int(world_size):
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if not _positive_int(shuffle_buffer):
            raise ValueError(f"shuffle_buffer must be a positive int (1 = no shuffling), got {shuffle_buffer!r}")
        if shuffle not in SHUFFLES:
            raise ValueError(f"shuffle must be one of {', '.join(SHUFFLES)}, got {shuffle!r}")
        if not _positive_int(block_shards):
            raise ValueError(f"block_shards must be a positive int, got {block_shards!r}")
        self.index = read_index(source, split)
        if tuple(keys) != (self.index.array_key, self.index.label_key):
            raise ValueError(
                f"keys {tuple(keys)!r} do not match the index {self.index.path} "
                f"(array {self.index.array_key!r}, label {self.index.label_key!r})"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = shuffle_buffer
        self.shuffle = shuffle
        self.block_shards = block_shards
        self._reader = _ShardReader(self.index)
        self._start = (0, 0)  # (epoch, batch_in_epoch) the iteration begins at

    @property
    def num_classes(self) -> int:
        return self.index.num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.index.shape

    def check_workers(self, num_workers: int) -> None:
        """Raise DataError unless every (rank, worker) slot gets at least one shard and one batch."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
        num_slots = self.world_size * max(1, num_workers)
        num_shards = len(self.index.shard_paths)
        if num_shards < num_slots:
            raise DataError(
                f"{self.index.path}: {num_shards} shards cannot feed world_size={self.world_size} x "
                f"num_workers={num_workers} = {num_slots} readers; write at least {num_slots} shards"
            )
        # Whatever the epoch's shard order, a slot holds at least num_shards // num_slots shards.
        fewest = sum(sorted(self.index.counts)[: num_shards // num_slots])
        if fewest < self.batch_size:
            raise DataError(
                f"{self.index.path}: with {num_slots} readers a reader may get only {fewest} samples per epoch, "
                f"fewer than batch_size={self.batch_size}; write more samples per shard or use fewer readers"
            )

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into the index's shard list, in the order epoch `epoch` reads them."""
        rng = np.random.default_rng(_derived_seed(self.seed, epoch, _SHARD_ORDER_TAG))
        return rng.permutation(len(self.index.shard_paths)).tolist()

    def slot_shards(self, epoch: int, slot: int, num_slots: int) -> list[Path]:
        return [self.index.shard_paths[i] for i in self.shard_order(epoch)[slot::num_slots]]

    def batches_per_slot(self, epoch: int, num_slots: int) -> int:
        order = self.shard_order(epoch)
        smallest = min(sum(self.index.counts[i] for i in order[slot::num_slots]) for slot in range(num_slots))
        if smallest < self.batch_size:
            raise DataError(
                f"{self.index.path}: a reader slot (of {num_slots}) gets only {smallest} samples in epoch {epoch}, "
                f"fewer than batch_size={self.batch_size}"
            )
        return smallest // self.batch_size

    def batches_per_epoch(self, epoch: int, num_workers: int) -> int:
        """Steps each rank takes in `epoch` (the same on every rank)."""
        readers = max(1, num_workers)
        return self.batches_per_slot(epoch, self.world_size * readers) * readers

    def at(self, epoch: int, batch_in_epoch: int) -> ShardDataset:
        """A copy whose iteration starts at the given data position."""
        positioned = copy.copy(self)
        positioned._start = (epoch, batch_in_epoch)
        return positioned

    def _slot_batches(self, epoch: int, slot: int, num_slots: int, skip: int) -> Iterator[Batch]:
        if self.shuffle == "blocks":
            yield from self._block_batches(epoch, slot, num_slots, skip)
            return
        num_batches = self.batches_per_slot(epoch, num_slots)
        samples = self._reader.samples(self.slot_shards(epoch, slot, num_slots))
        rng = random.Random(_derived_seed(self.seed, epoch, slot, _SAMPLE_SHUFFLE_TAG))
        shuffled = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        kept = islice(shuffled, skip * self.batch_size, num_batches * self.batch_size)
        try:
            yield from wds.batched(self.batch_size, collation_fn=_collate, partial=False)(kept)
        finally:
            samples.close()  # closes the open shard file when we stop early

    def slot_blocks(self, epoch: int, slot: int, num_slots: int) -> list[tuple[list[Path], int]]:
        """The slot's blocks in epoch `epoch`: (shards, samples in them), from the index alone."""
        order = self.shard_order(epoch)[slot::num_slots]
        groups = [order[i:i + self.block_shards] for i in range(0, len(order), self.block_shards)]
        return [([self.index.shard_paths[i] for i in group], sum(self.index.counts[i] for i in group))
                for group in groups]

    def block_position(self, epoch: int, slot: int, num_slots: int, skip: int) -> tuple[int, int]:
        """(block, offset in it) of the sample after `skip` batches of the slot's epoch stream."""
        remaining = skip * self.batch_size
        blocks = self.slot_blocks(epoch, slot, num_slots)
        for number, (_, size) in enumerate(blocks):
            if remaining < size:
                return number, remaining
            remaining -= size
        return len(blocks), 0

    def _block_batches(self, epoch: int, slot: int, num_slots: int, skip: int) -> Iterator[Batch]:
        wanted = (self.batches_per_slot(epoch, num_slots) - skip) * self.batch_size
        start_block, offset = self.block_position(epoch, slot, num_slots, skip)

        def samples() -> Iterator[tuple[str, np.ndarray, int]]:
            for number, (shards, _) in enumerate(self.slot_blocks(epoch, slot, num_slots)):
                if number < start_block:
                    continue  # never read: the position says where to start
                block = list(self._reader.samples(shards))
                rng = np.random.default_rng(_derived_seed(self.seed, epoch, slot, number, _BLOCK_SHUFFLE_TAG))
                order = rng.permutation(len(block))
                yield from (block[i] for i in order[offset if number == start_block else 0:])

        kept = islice(samples(), max(0, wanted))
        yield from wds.batched(self.batch_size, collation_fn=_collate, partial=False)(kept)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_readers = (info.id, info.num_workers) if info is not None else (0, 1)
        start_epoch, start_batch = self._start
        # DataLoader always starts its round-robin at worker 0; rotate the roles so
        # worker 0 plays whoever owns the next batch of the interrupted sequence.
        role = (worker + start_batch) % num_readers
        num_slots = self.world_size * num_readers
        slot = self.rank * num_readers + role
        for epoch in count(start_epoch):
            skip = _batches_taken_by(role, start_batch, num_readers) if epoch == start_epoch else 0
            yield from self._slot_batches(epoch, slot, num_slots, skip)


def _one_line(error: DataError) -> str:
    """DataLoader re-raises a worker's error with its whole traceback in the message; keep the last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(error)
    name, _, message = lines[-1].partition(": ")
    return message if name.endswith("DataError") else lines[-1]


class ShardLoader:
    """The infinite batch iterator the trainer holds; knows and restores its data position."""

    def __init__(self, dataset: ShardDataset, num_workers: int = 0) -> None:
        dataset.check_workers(num_workers)
        self.dataset = dataset
        self.num_workers = num_workers
        self.epoch = 0
        self.batch_in_epoch = 0
        self._epoch_length = dataset.batches_per_epoch(0, num_workers)
        self._batches: Iterator[Batch] | None = None

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = self._open()
        try:
            batch = next(self._batches)
        except DataError as error:
            self.close()
            raise DataError(_one_line(error)) from None
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self._epoch_length:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._epoch_length = self.dataset.batches_per_epoch(self.epoch, self.num_workers)
        return batch

    def _open(self) -> Iterator[Batch]:
        positioned = self.dataset.at(self.epoch, self.batch_in_epoch)
        if self.num_workers == 0:
            return iter(positioned)
        return iter(DataLoader(positioned, batch_size=None, num_workers=self.num_workers, persistent_workers=False))

    def close(self) -> None:
        """Stop worker processes now; the next batch reopens the stream at the current position."""
        batches, self._batches = self._batches, None
        # Shut workers down explicitly: left to the garbage collector (a worker's exception
        # keeps the DataLoader iterator in a reference cycle), shutdown can stall ~10 s.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def _identity(self) -> dict[str, int]:
        # What must match for a saved position to mean the same batches on restore.
        dataset = self.dataset
        return {
            "seed": dataset.seed,
            "batch_size": dataset.batch_size,
            "num_workers": self.num_workers,
            "world_size": dataset.world_size,
            "num_samples": dataset.index.total,
            "num_shards": len(dataset.index.shard_paths),
            **({"shuffle_blocks": dataset.block_shards} if dataset.shuffle == "blocks" else {}),
        }

    def state_dict(self) -> dict[str, int]:
        """Position of the NEXT batch plus what it depends on (plain ints: safe for weights_only loads)."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self._identity()}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue exactly where `state` was taken (the same on every rank)."""
        if ("shuffle_blocks" in state) != (self.dataset.shuffle == "blocks"):
            saved = "blocks" if "shuffle_blocks" in state else "buffer"
            raise ValueError(f"data state was saved with shuffle={saved!r} but this loader has "
                             f"shuffle={self.dataset.shuffle!r}; resuming would not reproduce the same batches")
        for name, value in self._identity().items():
            if state.get(name, value) != value:
                raise ValueError(
                    f"data state was saved with {name}={state[name]!r} but this loader has {name}={value!r}; "
                    f"resuming would not reproduce the same batches"
                )
        epoch, batch_in_epoch = state.get("epoch"), state.get("batch_in_epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"data state epoch must be a non-negative int, got {epoch!r}")
        epoch_length = self.dataset.batches_per_epoch(epoch, self.num_workers)
        valid_position = isinstance(batch_in_epoch, int) and not isinstance(batch_in_epoch, bool)
        if not valid_position or not 0 <= batch_in_epoch < epoch_length:
            raise ValueError(f"data state batch_in_epoch must be an int in [0, {epoch_length}), got {batch_in_epoch!r}")
        self.close()
        self.epoch, self.batch_in_epoch, self._epoch_length = epoch, batch_in_epoch, epoch_length


def resolve_shuffle(shuffle: str, index: ShardIndex) -> str:
    """'auto': 'buffer' for a set small enough to keep decoded in memory, 'blocks' (O(1) resume) above."""
    if shuffle != "auto":
        return shuffle
    on_disk = sum(path.stat().st_size for path in index.shard_paths)
    return "buffer" if on_disk <= DECODED_CACHE_BYTES else "blocks"


def make_loader(dataset: ShardDataset, num_workers: int = 0) -> ShardLoader:
    """An infinite iterator of full batches with `state_dict()` / `load_state_dict()`."""
    return ShardLoader(dataset, num_workers)


def load_split_arrays(source: str | os.PathLike, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in index order, validated: x (N, *shape) in the stored dtype, y int64 (N,)."""
    index = read_index(source, split)
    reader = _ShardReader(index)
    arrays, labels = [], []
    for _, array, label in reader.samples(index.shard_paths):
        arrays.append(array)
        labels.append(label)
    return np.stack(arrays), np.asarray(labels, dtype=np.int64)
