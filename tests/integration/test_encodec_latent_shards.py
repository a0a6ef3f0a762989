"""Spoken digits at 24 kHz pre-encoded by EnCodec into latent shards, end to end, with RANDOM EnCodec
weights (the published checkpoint cannot be downloaded here): `selfflow data encode` writes the raw
latents with the source's keys and labels, the latent experiment normalises them with the train
shards' per-channel statistics and trains a step."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from selfflow.components.datasets.spoken_digits import speaker_split
from selfflow.components.tokenizers.encodec import EncodecTokenizer
from selfflow.platform.data.loader import load_split_arrays, read_index
from selfflow.platform.data.shards import build_spoken_digits_shards

RANDOM = ["EncodecTokenizer.repository = None", "EncodecTokenizer.random_init_for_tests = True"]


@pytest.fixture(scope="module")
def speech_24k(tmp_path_factory):
    groups = speaker_split(0)
    root = tmp_path_factory.mktemp("data") / "spoken_digits_24k"
    build_spoken_digits_shards(root, seed=0, sample_rate=24000, speakers=groups["train"][:1] + groups["test"][:1],
                               train_shards=2, test_shards=1)
    return root


@pytest.mark.filterwarnings("ignore:EncodecTokenizer. RANDOM weights:UserWarning")
@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_encode_shards_then_train_on_normalised_latents(in_tmp, speech_24k):
    from selfflow.platform.cli import main

    out = in_tmp / "data" / "spoken_digits_24k_encodec"
    args = ["data", "encode", "--source", str(speech_24k), "--tokenizer-gin", "tokenizers/encodec_24khz.gin",
            "--out", str(out), "--batch-size", "8", "--quiet"]
    for binding in RANDOM:
        args += ["--gin_param", binding]
    assert main(args) == 0

    tokenizer = EncodecTokenizer(None, data_shape=(1, 15360), random_init_for_tests=True)
    for split in ("train", "test"):
        source_x, source_y = load_split_arrays(speech_24k, split)
        latents, labels = load_split_arrays(out, split)
        assert latents.shape == (source_x.shape[0], 128, 48) and latents.dtype == np.float32
        assert np.array_equal(labels, source_y)
        expected = tokenizer.encode_latents(torch.from_numpy(source_x[:4]))
        assert torch.allclose(torch.from_numpy(latents[:4]), expected, atol=1e-4)
        assert "EncodecTokenizer" in read_index(out, split).metadata["encoded_by"]

    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train.driver import train

    config.parse(["audio/encodec_fm.gin"], RANDOM)
    experiment = build_from_gin()
    train_latents, _ = load_split_arrays(out, "train")
    per_channel = torch.from_numpy(train_latents).double().transpose(0, 1).reshape(128, -1)
    assert torch.allclose(experiment.tokenizer.normalization.mean, per_channel.mean(1).float(), atol=1e-4)
    assert torch.allclose(experiment.tokenizer.normalization.std, per_channel.std(1).float(), atol=1e-4)
    tokens = experiment.tokenizer.encode(torch.from_numpy(train_latents))
    assert tokens.shape == (train_latents.shape[0], 48, 128)
    assert abs(float(tokens.mean())) < 1e-3 and abs(float(tokens.std()) - 1.0) < 1e-2

    steps = ["TrainConfig.steps = 1", "TrainConfig.batch_size = 4", "TrainConfig.checkpoint_every = 0",
             "SamplingConfig.steps = 2", "SamplingConfig.per_class = 1"]
    result = train(["audio/encodec_fm.gin"], RANDOM + steps, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs",
                   tracking=False, progress=False)
    assert math.isfinite(result.final_metrics["loss/flow"])
    assert sorted((result.run_dir / "samples").glob("*.wav"))  # decoded back to 24 kHz waveforms by EnCodec
