"""Evaluator networks: the feature extractors FD, sample class accuracy and precision/recall use.

ClassifierEvaluator trains a small CNN classifier on the dataset (cached by a content hash of its
recipe and the data); InceptionEvaluator loads Inception-v3 from a local weights file.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from selfflow.components.metrics.evaluator import (
    ClipClassifierCNN,
    DigitClassifierCNN,
    SpectrogramClassifierCNN,
    accuracy,
    fit_classifier,
)
from selfflow.platform import torchfile
from selfflow.platform.errors import CheckpointError, ConfigError, UserError

if TYPE_CHECKING:
    from selfflow.platform.evaluate.eval_data import EvalData

log = logging.getLogger("selfflow.evaluation")

EVALUATOR_FORMAT = 1

@dataclass
class LoadedEvaluator:
    """An evaluator ready to use: `network.features(images)` (and `network.head` for logits)."""

    network: nn.Module
    key: str
    metrics: dict[str, float]
    path: Path | None
    fitted_now: bool = False


class ClassifierEvaluator:
    """Recipe of a dataset's evaluator: a small CNN classifier trained here (DigitClassifierCNN for
    images (C, H, W), ClipClassifierCNN for clips (C, F, H, W), SpectrogramClassifierCNN for waveforms (C, T)).

    The trained network is cached in `<cache_dir>/<key>.pt`, key = content hash of this
    recipe, the network's shape and the data (index files and array bytes): the same
    config on the same data is trained once and shared by every run.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        steps: int = 600,
        batch_size: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_shift: int = 1,
        seed: int = 0,
    ):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"ClassifierEvaluator.steps must be a positive int, got {steps!r}")
        if max_shift < 0:
            raise ConfigError(f"ClassifierEvaluator.max_shift must be >= 0, got {max_shift}")
        self.channels = [int(c) for c in channels]
        self.steps, self.batch_size, self.lr = steps, int(batch_size), float(lr)
        self.weight_decay, self.max_shift, self.seed = float(weight_decay), int(max_shift), int(seed)

    def recipe(self) -> dict[str, Any]:
        return {"kind": "DigitClassifierCNN", "format": EVALUATOR_FORMAT, "channels": self.channels,
                "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "max_shift": self.max_shift, "seed": self.seed}

    def build(self, data: "EvalData") -> DigitClassifierCNN | ClipClassifierCNN | SpectrogramClassifierCNN:
        shape = tuple(data.test_images.shape[1:])
        if len(shape) == 2:
            return SpectrogramClassifierCNN(num_classes=data.num_classes, in_channels=shape[0], samples=shape[1],
                                            channels=self.channels, data_range=data.data_range, seed=self.seed)
        if len(shape) not in (3, 4) or shape[-1] != shape[-2]:
            raise ConfigError(f"ClassifierEvaluator needs waveforms (C, T), square images (C, H, W) or clips "
                              f"(C, F, H, W), the data holds {shape}")
        if len(shape) == 4:
            return ClipClassifierCNN(num_classes=data.num_classes, in_channels=shape[0], frames=shape[1],
                                     image_size=shape[2], channels=self.channels, data_range=data.data_range,
                                     seed=self.seed)
        return DigitClassifierCNN(num_classes=data.num_classes, in_channels=shape[0], image_size=shape[1],
                                  channels=self.channels, data_range=data.data_range, seed=self.seed)

    def load_or_fit(self, data: "EvalData", cache_dir: Path) -> LoadedEvaluator:
        if data.num_classes < 2:
            raise ConfigError("ClassifierEvaluator needs labelled data with >= 2 classes")
        network = self.build(data)
        key = content_hash({"recipe": self.recipe(), "network": network.config(), "data": data.fingerprint})
        path = Path(cache_dir) / f"{key}.pt"
        if path.is_file():
            try:
                stored = torchfile.load(path)
                if stored.get("format") != EVALUATOR_FORMAT or stored.get("key") != key:
                    raise CheckpointError(f"{path} belongs to another evaluator")
                network.load_state_dict(stored["state_dict"])
                network.requires_grad_(False).eval()
                return LoadedEvaluator(network, key, dict(stored["metrics"]), path)
            except (CheckpointError, KeyError, RuntimeError) as error:
                log.warning("evaluator cache %s unusable (%s): training it again", path, error)
        started, started_cpu = time.perf_counter(), time.process_time()
        generator = torch.Generator().manual_seed(self.seed)
        metrics = fit_classifier(network, data.train_images, data.train_y, generator=generator, steps=self.steps,
                                 batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                                 max_shift=self.max_shift)
        metrics["test_accuracy"] = accuracy(network, data.test_images, data.test_y)
        metrics["fit_seconds"] = time.perf_counter() - started
        metrics["fit_cpu_seconds"] = time.process_time() - started_cpu
        torchfile.save_atomic({"format": EVALUATOR_FORMAT, "key": key, "recipe": json.dumps(self.recipe()),
                          "state_dict": network.state_dict(), "metrics": metrics}, path)
        log.info("trained evaluator %s: test accuracy %.3f -> %s", key, metrics["test_accuracy"], path)
        return LoadedEvaluator(network, key, metrics, path, fitted_now=True)


class InceptionEvaluator:
    """Inception-v3 features from a local weights file (ImageNet-scale runs); nothing is trained.

    weights_path: e.g. pt_inception-2015-12-05-6726825d.pth (flavour 'fid', needs torch-fidelity;
    FD comparable to published FID) or torchvision's inception_v3_google-0cc3c7bd.pth
    (flavour 'torchvision'). See components/metrics/inception.py.
    """

    def __init__(self, weights_path: str = "", flavour: str = "fid"):
        if not weights_path:
            raise ConfigError("InceptionEvaluator.weights_path must name a local Inception-v3 weights file")
        self.weights_path, self.flavour = os.path.expanduser(weights_path), flavour

    def load_or_fit(self, data: "EvalData", cache_dir: Path) -> LoadedEvaluator:
        from selfflow.components.metrics.inception import InceptionFeatures

        try:
            network = InceptionFeatures(self.weights_path, self.flavour, data.data_range)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(str(error)) from None
        key = f"inception-{self.flavour}-{Path(self.weights_path).name}"
        return LoadedEvaluator(network, key, {}, Path(self.weights_path))


def content_hash(content: Any) -> str:
    """Short sha256 of a JSON-able value (keys sorted): the evaluator cache key."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


