"""ShardData: the gin-facing description of a dataset stored as webdataset shards."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from selfflow.platform.data import DataError
from selfflow.platform.data.loader import (
    SHUFFLES,
    ShardDataset,
    load_split_arrays,
    make_loader,
    read_index,
    resolve_index_path,
    resolve_shuffle,
)
from selfflow.platform.errors import UserError


class ShardData:
    """Where a dataset's shards are and what they hold.

    root: folder with `{split}.index.json` files written by `selfflow data ...`.
    sample_rate: audio only, Hz of the waveforms (sample players need it; checked against the
        shards' metadata when it records one). 0 for other modalities.
    shuffle: 'buffer' (webdataset's shuffle buffer; resume replays the epoch up to the position),
        'blocks' (`block_shards` shards permuted together; resume reads one block, whatever the
        position) or 'auto' ('buffer' for sets kept decoded in memory, 'blocks' above); loader.py.
    """

    def __init__(
        self,
        root: str = "data/digits",
        num_classes: int = 0,
        data_shape: tuple = (),
        dataset: str = "unknown",
        modality: str = "image",
        train_split: str = "train",
        eval_split: str = "test",
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        sample_rate: int = 0,
        shuffle: str = "auto",
        block_shards: int = 4,
    ):
        if num_classes < 0:
            raise UserError(f"ShardData.num_classes must be >= 0, got {num_classes}")
        if num_workers < 0:
            raise UserError(f"ShardData.num_workers must be >= 0, got {num_workers}")
        self.root = Path(os.path.expanduser(root))
        self.num_classes = int(num_classes)
        self.data_shape = tuple(data_shape)
        self.dataset = dataset
        self.modality = modality
        self.train_split = train_split
        self.eval_split = eval_split
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        if shuffle not in ("auto", *SHUFFLES):
            raise UserError(f"ShardData.shuffle must be one of auto, {', '.join(SHUFFLES)}, got {shuffle!r}")
        self.shuffle, self.block_shards = shuffle, int(block_shards)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 0:
            raise UserError(f"ShardData.sample_rate must be an int >= 0 (Hz), got {sample_rate!r}")
        self.sample_rate = sample_rate

    def _index(self, split: str):
        try:
            index = read_index(self.root, split)
        except DataError as error:
            built_here = {"digits": "selfflow data digits", "moving_digits": "selfflow data moving_digits",
                          "spoken_digits": "selfflow data spoken_digits"}
            hint = built_here.get(self.dataset, "selfflow data images --folder ... --out ...")
            raise UserError(f"{error} (build it with `{hint}`)") from None
        if self.data_shape and tuple(index.shape) != self.data_shape:
            raise UserError(
                f"shards in {self.root} hold arrays of shape {tuple(index.shape)}, the config expects {self.data_shape}"
            )
        if self.num_classes and index.num_classes > self.num_classes:
            raise UserError(f"ShardData.num_classes is {self.num_classes}, but the shards in {self.root} hold "
                            f"labels of {index.num_classes} classes ({index.path}): set ShardData.num_classes = "
                            f"{index.num_classes}")
        recorded = index.metadata.get("sample_rate")
        if self.sample_rate and recorded is not None and int(recorded) != self.sample_rate:
            raise UserError(f"shards in {self.root} hold {recorded} Hz audio, ShardData.sample_rate is {self.sample_rate}")
        return index

    def check_split(self, split: str) -> None:
        """UserError now if `split` is missing, damaged or disagrees with this config (a run checks
        every split it will read before it trains)."""
        self._index(split)

    def loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """Infinite iterator of {'x', 'y'} batches with state_dict/load_state_dict."""
        index = self._index(self.train_split)
        try:
            dataset = ShardDataset(
                index.path, batch_size, seed, rank=rank, world_size=world_size, shuffle_buffer=self.shuffle_buffer,
                shuffle=resolve_shuffle(self.shuffle, index), block_shards=self.block_shards,
            )
            loader = make_loader(dataset, num_workers=self.num_workers)
        except (DataError, ValueError) as error:
            raise UserError(str(error)) from None
        return loader

    def index_digest(self, split: str) -> str | None:
        """sha256 of the split's index file (it names every shard and its checksum); None without one."""
        path = resolve_index_path(self.root, split)
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None

    def arrays(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A whole split as arrays, in index order (for evaluation)."""
        index = self._index(split or self.eval_split)
        return load_split_arrays(index.path)
