"""What components with pretrained weights share (SD-VAE, EnCodec, timm encoders): local folders
only, the hub offline, meta builds.

Weights are never downloaded at run time: a tokenizer names a local folder in the layout `hf download
<repo> --local-dir <folder>` writes (config.json beside the weight file) and reads it with the hub
offline. Under a meta default device (a config check of a large experiment) nothing is read.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch


class WeightsNotFoundError(FileNotFoundError, ValueError):
    """Local weights are missing. A ValueError too, so config builders report it as one line."""


def building_on_meta() -> bool:
    """True inside `with torch.device("meta")`: build for a config check, read nothing from disk."""
    return torch.get_default_device().type == "meta"


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def check_data_range(data_range: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in data_range)
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
    return low, high


def read_local_config(folder: Path, weight_files: Sequence[str], what: str, source: str) -> dict[str, Any]:
    """`folder`/config.json as a dict, after checking that one of `weight_files` sits beside it.

    what: the model's name in messages ("SD-VAE"); source: the hub repository to download it from.
    Every failure is one line that says which file is missing and how to get it.
    """
    if folder.is_file():
        raise ValueError(f"{what} weights_path must be a folder (config.json + {weight_files[0]}), got the file {folder}")
    config_file = folder / "config.json"
    if not config_file.is_file() or not any((folder / name).is_file() for name in weight_files):
        raise WeightsNotFoundError(
            f"{what} weights not found in {folder}: download {source} to that folder on a machine with internet "
            f"(`hf download {source} --local-dir {folder}`); expected {config_file} and {folder / weight_files[0]}"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the {what} config {config_file}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON object")
    return config
