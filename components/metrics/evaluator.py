"""The evaluator networks of small image, video and audio datasets: CNN classifiers, and their pure-torch fit.

Generated samples are scored on this network's features (Fréchet distance,
precision/recall) and its predictions (does a sample of class c look like c?).
It is deliberately NOT the REPA external encoder (components/encoders/
digit_encoder.py, a ViT on 2x2 patches): a different architecture
(convolutions, no attention, global average pooling), trained separately, so
REPA is never scored by its own teacher.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.components.audio import unit_mono


class DigitClassifierCNN(nn.Module):
    """Conv classifier for small images (B, C, H, W) with values in `data_range`.

    Two stages of [conv3x3-ReLU-conv3x3-ReLU] with a 2x2 max-pool between them,
    then global average pooling: the pooled vector (width channels[-1]) is the
    feature space (like Inception's pool features), a linear layer gives logits.
    seed: parameter initialisation from a private RNG (the global one is untouched).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        channels: Sequence[int] = (32, 64),
        data_range: Sequence[float] = (0.0, 1.0),
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        channels = tuple(channels)
        if len(channels) != 2 or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be two positive ints (one per stage), got {channels!r}")
        if image_size < 2:
            raise ValueError(f"image_size must be >= 2 (one 2x2 pooling), got {image_size}")
        low, high = (float(v) for v in data_range)
        if not high > low:
            raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.channels, self.data_range, self.seed = channels, (low, high), seed
        self.num_features = channels[-1]
        first, second = channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stage1 = nn.Sequential(
                nn.Conv2d(in_channels, first, 3, padding=1), nn.ReLU(),
                nn.Conv2d(first, first, 3, padding=1), nn.ReLU(),
            )
            self.stage2 = nn.Sequential(
                nn.Conv2d(first, second, 3, padding=1), nn.ReLU(),
                nn.Conv2d(second, second, 3, padding=1), nn.ReLU(),
            )
            self.head = nn.Linear(second, num_classes)

    def config(self) -> dict:
        """Constructor arguments (plain values): enough to rebuild the network."""
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "image_size": self.image_size,
                "channels": list(self.channels), "data_range": list(self.data_range), "seed": self.seed}

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if images.dim() == 3 and self.in_channels == 1:
            images = images.unsqueeze(1)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"evaluator takes images (B, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        return images.float()

    def feature_maps(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features, H / 2, W / 2): the last stage's maps, before pooling."""
        low, high = self.data_range
        x = (self._check(images) - (low + high) / 2) / ((high - low) / 2)  # -> [-1, 1]
        return self.stage2(F.max_pool2d(self.stage1(x), 2))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_features) pooled features."""
        return self.feature_maps(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.head(self.features(images))


class ClipClassifierCNN(nn.Module):
    """Classifier for short clips (B, C, F, H, W) with values in `data_range`: the evaluator of video.

    Every frame goes through the same two 2-D conv stages as DigitClassifierCNN (max-pooled over
    space to a vector), then a temporal conv (kernel 3) mixes neighbouring frames and the result is
    averaged over time: the pooled vector is the feature space (an FVD-style feature for clips).
    Trained on the clip's class only, so its features weigh appearance more than motion.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        frames: int = 8,
        image_size: int = 16,
        channels: Sequence[int] = (32, 64),
        data_range: Sequence[float] = (0.0, 1.0),
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.frame_net = DigitClassifierCNN(num_classes, in_channels, image_size, channels, data_range, seed)
            width = self.frame_net.num_features
            self.temporal = nn.Sequential(nn.Conv1d(width, width, 3, padding=1), nn.ReLU())
        self.head = self.frame_net.head  # logits come from the clip feature; the per-frame head is reused
        self.num_classes, self.in_channels, self.frames, self.image_size = num_classes, in_channels, frames, image_size
        self.channels, self.data_range, self.seed = self.frame_net.channels, self.frame_net.data_range, seed
        self.num_features = width

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "frames": self.frames,
                "image_size": self.image_size, "channels": list(self.channels), "data_range": list(self.data_range),
                "seed": self.seed}

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, num_features)."""
        expected = (self.in_channels, self.frames, self.image_size, self.image_size)
        if clips.dim() != 5 or tuple(clips.shape[1:]) != expected:
            raise ValueError(f"evaluator takes clips (B, {', '.join(map(str, expected))}), got {tuple(clips.shape)}")
        batch, channels, frames, height, width = clips.shape
        per_frame = clips.transpose(1, 2).reshape(batch * frames, channels, height, width)
        # Max, not mean, over space: the glyph covers a quarter of the canvas, the rest is background.
        maps = self.frame_net.feature_maps(per_frame)
        vectors = maps.amax(dim=(2, 3)).reshape(batch, frames, -1).transpose(1, 2)  # (B, D, F)
        return self.temporal(vectors).mean(dim=2)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clips))


class SpectrogramClassifierCNN(nn.Module):
    """Classifier for short waveforms (B, C, T) with values in `data_range`: the evaluator of audio.

    The channels are averaged to mono, then a log-magnitude STFT (Hann window `n_fft`, hop `hop`)
    makes a (frequency, time) image; each stage is conv3x3-ReLU followed (except the last) by a 2x2
    max-pool. The maps are averaged over time only and a linear layer + ReLU over (channel, frequency)
    gives the feature vector (width channels[-1]): an FAD-style feature space of this platform's own.
    Pooling over frequency too would throw away where the energy is (convolutions are shift-equivariant:
    a 300 Hz and a 2.5 kHz tone would look alike; measured: such a net stayed at chance on that task).
    """

    background = 0.0  # silence: what a time shift fills in (fit_classifier's augmentation)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        samples: int = 5120,
        channels: Sequence[int] = (16, 32, 64),
        data_range: Sequence[float] = (-1.0, 1.0),
        n_fft: int = 256,
        hop: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("samples", samples),
                            ("n_fft", n_fft), ("hop", hop)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        channels = tuple(channels)
        if not channels or not all(isinstance(c, int) and c > 0 for c in channels):
            raise ValueError(f"channels must be positive ints (one per stage), got {channels!r}")
        if samples < n_fft:
            raise ValueError(f"samples ({samples}) must be at least n_fft ({n_fft})")
        low, high = (float(v) for v in data_range)
        if not high > low:
            raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
        self.num_classes, self.in_channels, self.samples = num_classes, in_channels, samples
        self.channels, self.data_range, self.n_fft, self.hop, self.seed = channels, (low, high), n_fft, hop, seed
        self.num_features = channels[-1]
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers, width = [], 1
            for index, out in enumerate(channels):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU()]
                if index < len(channels) - 1:
                    layers.append(nn.MaxPool2d(2))
                width = out
            self.stages = nn.Sequential(*layers)
            bins = n_fft // 2 + 1
            for _ in channels[1:]:
                bins //= 2  # each MaxPool2d(2) floors the frequency size
            if bins < 1:
                raise ValueError(f"n_fft {n_fft} leaves no frequency bins after {len(channels) - 1} poolings")
            self.frequency_bins = bins
            self.project = nn.Sequential(nn.Flatten(), nn.Linear(width * bins, width), nn.ReLU())
            self.head = nn.Linear(width, num_classes)

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "in_channels": self.in_channels, "samples": self.samples,
                "channels": list(self.channels), "data_range": list(self.data_range), "n_fft": self.n_fft,
                "hop": self.hop, "seed": self.seed, "pooling": "time"}

    def spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, 1, n_fft // 2 + 1, frames) log magnitudes."""
        expected = (self.in_channels, self.samples)
        if audio.dim() != 3 or tuple(audio.shape[1:]) != expected:
            raise ValueError(f"evaluator takes waveforms (B, {', '.join(map(str, expected))}), got {tuple(audio.shape)}")
        spectrum = torch.stft(unit_mono(audio, self.data_range), self.n_fft, self.hop, window=self.window, return_complex=True)
        # log(1e-3 + |X|) spans about [-7, 4] here; the affine keeps it near [-1, 1] for the first conv.
        return ((spectrum.abs() + 1e-3).log()[:, None] + 1.5) / 4.0

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, num_features)."""
        return self.project(self.stages(self.spectrogram(audio)).mean(dim=3))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(audio))


@torch.no_grad()
def batched_outputs(model: nn.Module, images: torch.Tensor,
                    batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(features (M, D), logits (M, C) or None) of `model` in eval mode, in batches.

    `model` has `features(images)`; logits come from its `head` when it has one.
    """
    was_training = model.training
    model.eval()
    head = getattr(model, "head", None)
    features, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = model.features(images[start:start + batch_size])
        features.append(chunk)
        if head is not None:
            logits.append(head(chunk))
    model.train(was_training)
    return torch.cat(features), (torch.cat(logits) if head is not None else None)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """Translate each image (B, C, H, W) by its own integer offset in [-max_shift, max_shift]^2, filling
    with `fill`; a clip (B, C, F, H, W) moves every frame by the clip's one offset; a waveform (B, C, T)
    moves in time by an offset in [-max_shift, max_shift] samples."""
    if max_shift <= 0:
        return images
    if images.dim() == 3:
        batch, _, length = images.shape
        padded = F.pad(images, (max_shift, max_shift), value=fill)
        offsets = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
        index = (offsets[:, None] + torch.arange(length))[:, None, :].expand(-1, images.shape[1], -1)
        return padded.gather(2, index)
    if images.dim() == 5:
        return random_shift(images.flatten(1, 2), max_shift, generator, fill).reshape(images.shape)
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator)
    rows = offsets[0][:, None] + torch.arange(height)  # (B, H) rows of the padded image
    cols = offsets[1][:, None] + torch.arange(width)  # (B, W)
    picked = padded.permute(0, 2, 3, 1)[torch.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Share of images the classifier labels correctly."""
    _, logits = batched_outputs(model, images, batch_size)
    return float((logits.argmax(dim=1) == labels).float().mean())


def fit_classifier(
    model: DigitClassifierCNN | ClipClassifierCNN | SpectrogramClassifierCNN,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 1,
) -> dict[str, float]:
    """Supervised training (AdamW, cross-entropy, cosine-decayed lr, random shifts).

    images (M, C, H, W) in the model's data_range, labels (M,) int64. Minibatches and
    shifts come from `generator`. Returns {"final_loss", "train_accuracy"}; the model
    ends in eval mode with gradients off.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (> 0), got {images.shape[0]} images, {labels.shape[0]} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= model.num_classes:
        raise ValueError(f"labels must lie in [0, {model.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    images, labels = images.float(), labels.long()
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(images.shape[0], (batch_size,), generator=generator)
        fill = getattr(model, "background", model.data_range[0])  # images: the low end; audio: silence
        batch = random_shift(images[index], max_shift, generator, fill=fill)
        loss = F.cross_entropy(model(batch), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.requires_grad_(False)
    model.eval()
    return {"final_loss": float(loss.detach()), "train_accuracy": accuracy(model, images, labels)}
