"""Every shipped gin file parses, builds, and (at trainable sizes) runs one training step.

Experiment files are used as they are; preset fragments (a backbone size, a
sampler, ...) are layered on top of the digits base experiment so they are built
in the context they are meant for. Models too large for this CPU are built on
the meta device instead (no memory), which still checks every binding.
"""
from __future__ import annotations

import re
from pathlib import Path

import gin
import pytest
import torch

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.bootstrap import EXPERIMENTS_DIR
from selfflow.platform.config.experiment import build_from_gin

SKIP_FOLDERS = {"sweeps", "studies"}  # sweep and study specs are not experiments: tested with their runners
MAX_TRAINABLE_PARAMS = 30_000_000
LOCAL_DATASETS = ("digits", "moving_digits", "spoken_digits")  # built by the test session's fixtures
ONE_STEP = [
    "TrainConfig.steps = 1",
    "TrainConfig.batch_size = 8",
    "TrainConfig.eval_every = 0",
    "TrainConfig.checkpoint_every = 0",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
]


def shipped_gin_files() -> list[Path]:
    files = []
    for path in sorted(EXPERIMENTS_DIR.rglob("*.gin")):
        if SKIP_FOLDERS & set(path.relative_to(EXPERIMENTS_DIR).parts[:-1]):
            continue
        files.append(path)
    return files


def is_experiment(path: Path) -> bool:
    text = "\n".join(Path(f).read_text() for f in config._expand_includes([str(path)]))
    return bool(re.search(r"^build_experiment\.objective\s*=", text, re.M)) and bool(
        re.search(r"^build_experiment\.data\s*=", text, re.M)
    )


def files_for(path: Path) -> list[str]:
    if is_experiment(path):
        return [str(path)]
    stem = path.stem
    if "multimodal" in stem or "mixtures" in path.relative_to(EXPERIMENTS_DIR).parts:  # mixture pieces
        context = ["mixtures/all_three/fm.gin"]
    elif stem == "spoken_digits_24k":  # raw 24 kHz waveforms: EnCodec encodes them on the fly
        context = ["audio/selfflow.gin", "tokenizers/encodec_24khz.gin"]
    elif "encodec" in stem or "24k" in stem:  # EnCodec pieces: built in the 24 kHz EnCodec context
        context = ["audio/encodec_selfflow.gin"]
    elif "audio" in stem or "spoken_digits" in stem:  # waveform-shaped: built in the audio context
        context = ["audio/fm.gin"]
    elif "video" in stem or "moving_digits" in stem:  # clip-shaped: built in the video context
        context = ["video/fm.gin"]
    else:
        context = ["digits/fm.gin"]
    if "REPAObjective" in path.read_text():  # a REPA piece needs the rest of REPA around it
        context += ["objectives/repa.gin", "encoders/repa_digits_small.gin"]
    return context + [str(path)]


def test_there_are_shipped_gin_files():
    names = {p.relative_to(EXPERIMENTS_DIR).as_posix() for p in shipped_gin_files()}
    assert {"demo.gin", "digits/fm.gin", "backbones/dit_XL.gin", "video/selfflow.gin", "audio/selfflow.gin",
            "audio/encodec_selfflow.gin", "mixtures/digits_speech/selfflow.gin", "mixtures/all_three/selfflow.gin"} <= names


@pytest.fixture(scope="session")
def quick_encoders(tmp_path_factory, digits_root, spoken_digits_root, moving_digits_root) -> Path:
    """REPA presets point at platform-trained encoders: make tiny ones (few steps), for every modality."""
    from selfflow.platform.data.sources import ShardData
    from selfflow.platform.jobs.encoders import EncoderTraining

    gin.clear_config()  # the jobs are gin configurables: no bindings left by earlier tests
    folder = tmp_path_factory.mktemp("encoders")
    data = ShardData(root=str(digits_root), num_classes=10, data_shape=(1, 8, 8), dataset="digits")
    audio = ShardData(root=str(spoken_digits_root), num_classes=10, data_shape=(1, 5120), modality="audio")
    video = ShardData(root=str(moving_digits_root), num_classes=10, data_shape=(1, 8, 16, 16), modality="video")
    for size in ("small", "medium", "large"):
        EncoderTraining(data, size=size, steps=3, batch_size=16, out=str(folder / f"digit_encoder_{size}.pt")).run()
        EncoderTraining(audio, size=size, steps=2, batch_size=4,
                        out=str(folder / f"spoken_digit_encoder_{size}.pt")).run()
        EncoderTraining(video, size=size, steps=2, batch_size=4, out=str(folder / f"clip_encoder_{size}.pt")).run()
    return folder


@pytest.fixture(scope="session")
def quick_autoencoders(tmp_path_factory, digits_root, spoken_digits_root, moving_digits_root) -> Path:
    """Latent presets point at platform-trained conv autoencoders: make tiny ones."""
    from selfflow.platform.data.sources import ShardData
    from selfflow.platform.jobs.autoencoders import AutoencoderTraining

    gin.clear_config()  # the jobs are gin configurables: no bindings left by earlier tests
    folder = tmp_path_factory.mktemp("autoencoders")
    data = ShardData(root=str(digits_root), num_classes=10, data_shape=(1, 8, 8), dataset="digits")
    AutoencoderTraining(data, steps=3, batch_size=16, hidden_channels=8, out=str(folder / "conv_ae_digits.pt")).run()
    audio = ShardData(root=str(spoken_digits_root), num_classes=10, data_shape=(1, 5120), modality="audio")
    AutoencoderTraining(audio, latent_channels=8, hidden_channels=4, downsample=4, data_range=(-1.0, 1.0), steps=2,
                        batch_size=4, out=str(folder / "conv_ae_audio.pt")).run()
    video = ShardData(root=str(moving_digits_root), num_classes=10, data_shape=(1, 8, 16, 16), modality="video")
    AutoencoderTraining(video, latent_channels=8, hidden_channels=4, downsample=2, steps=2, batch_size=4,
                        out=str(folder / "conv_ae_video.pt")).run()
    return folder


@pytest.mark.filterwarnings("ignore:.*meta parameter.*:UserWarning")
@pytest.mark.parametrize("path", shipped_gin_files(), ids=lambda p: p.relative_to(EXPERIMENTS_DIR).as_posix())
def test_gin_file_builds_and_steps(path, in_tmp, quick_encoders, quick_autoencoders, moving_digits_root,
                                  spoken_digits_root):
    (in_tmp / "data" / "moving_digits").symlink_to(moving_digits_root)
    (in_tmp / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    (in_tmp / "runs").mkdir(exist_ok=True)
    (in_tmp / "runs" / "encoders").symlink_to(quick_encoders)
    (in_tmp / "runs" / "autoencoders").symlink_to(quick_autoencoders)
    files = files_for(path)
    if "tokenizers" in path.relative_to(EXPERIMENTS_DIR).parts[:1] and path.stem.endswith("_train"):
        from selfflow.platform.jobs.autoencoders import AutoencoderTraining

        config.parse([str(path)], ["AutoencoderTraining.steps = 2", "AutoencoderTraining.out = 'runs/ae.pt'"])
        AutoencoderTraining().run()
        assert (in_tmp / "runs" / "ae.pt").exists()
        return
    if "encoders" in path.relative_to(EXPERIMENTS_DIR).parts[:1] and path.stem.startswith(
            ("digits_", "spoken_digits_", "moving_digits_")):
        from selfflow.platform.jobs.encoders import EncoderTraining

        config.parse([str(path)], ["EncoderTraining.steps = 2", "EncoderTraining.out = 'runs/enc.pt'"])
        EncoderTraining().run()
        assert (in_tmp / "runs" / "enc.pt").exists()
        return
    config.parse(files, [])
    with torch.device("meta"):
        meta = build_from_gin()
    size = sum(p.numel() for p in meta.model.parameters())
    datasets = str(getattr(meta.data, "dataset", "")).split("+")  # a mixture names each part's
    if size > MAX_TRAINABLE_PARAMS or not set(datasets) <= set(LOCAL_DATASETS):
        return  # built (on meta) with every binding checked; too large or no local data for a step
    from selfflow.platform.train.driver import train

    result = train(files, ONE_STEP, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs", tracking=False, progress=False)
    assert result.checkpoint is not None and result.checkpoint.exists()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result.final_metrics.items() if k.startswith("loss/"))
