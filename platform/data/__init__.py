"""Data I/O: webdataset shard sets (writer in `shards`, safe deterministic reader in `loader`).

Every problem with a shard set on disk (missing index, empty or truncated shards,
forbidden or unknown members, samples that disagree with the index) raises DataError.
"""


class DataError(ValueError):
    """A shard set on disk is missing, damaged, unsafe or inconsistent with its index."""


__all__ = ["DataError"]
