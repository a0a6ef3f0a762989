"""Spoken digits: espeak-ng's words, cut and scaled by the documented rule, split by speaker; the
spectrogram evaluator, time shifts, and audio sample files."""
import math
import wave

import numpy as np
import pytest
import torch
from scipy.signal import resample_poly

from selfflow.components.datasets.spoken_digits import (
    ESPEAK_RATE,
    NUM_CLASSES,
    SPEAKERS,
    WORDS,
    clip_samples,
    prepare_clip,
    speaker_split,
    spoken_digits_split,
    synthesize,
)
from selfflow.components.metrics.evaluator import SpectrogramClassifierCNN, fit_classifier, random_shift
from selfflow.platform.data.loader import load_split_arrays, read_index
from selfflow.platform.evaluate.media import save_sample_grid, spectrogram_images


def test_speakers_are_split_disjointly_and_completely():
    groups = speaker_split(0)
    assert not set(groups["train"]) & set(groups["test"])
    assert set(groups["train"]) | set(groups["test"]) == set(SPEAKERS) and len(SPEAKERS) == 88
    assert len(groups["test"]) == round(0.2 * 88)
    assert speaker_split(0) == groups and speaker_split(1) != groups


def test_prepare_clip_follows_the_rule_by_hand():
    rate, samples = 8000, 4000
    source = np.zeros(ESPEAK_RATE, dtype=np.int16)
    source[5000:9000] = (8000 * np.sin(np.arange(4000) / 7.0)).astype(np.int16)
    clip = prepare_clip(source, ESPEAK_RATE, rate, samples)

    audio = resample_poly(source / 32768.0, 160, 441)  # 8000 / 22050 in lowest terms
    peak = np.abs(audio).max()
    onset = int(np.flatnonzero(np.abs(audio) > 0.02 * peak)[0])
    expected = np.zeros(samples)
    kept = audio[onset - 80:] * (0.9 / peak)  # 10 ms of lead at 8 kHz
    expected[:min(samples, kept.size)] = kept[:samples]
    assert clip.shape == (1, samples) and clip.dtype == np.float32
    np.testing.assert_allclose(clip[0], expected, atol=1e-6)
    assert math.isclose(float(np.abs(clip).max()), 0.9, rel_tol=1e-5)


def test_prepare_clip_rejects_silence_and_clip_length_must_be_whole():
    with pytest.raises(ValueError, match="silence"):
        prepare_clip(np.zeros(1000, dtype=np.int16), ESPEAK_RATE, 8000, 100)
    with pytest.raises(ValueError, match="whole"):
        clip_samples(8000, 0.00001)


def test_espeak_is_deterministic_and_clips_are_its_words():
    groups = speaker_split(0)
    speaker = groups["test"][0]
    clips, labels, info = spoken_digits_split("test", speakers=(speaker,), takes_per_digit=1)
    assert clips.shape == (NUM_CLASSES, 1, clip_samples()) and labels.tolist() == list(range(NUM_CLASSES))
    for digit in (0, 7):
        take = info[digit]
        assert take["speaker"] == speaker and 140 <= take["rate"] <= 200 and 30 <= take["pitch"] <= 70
        raw = synthesize(WORDS[digit], speaker, take["rate"], take["pitch"])
        assert np.array_equal(raw, synthesize(WORDS[digit], speaker, take["rate"], take["pitch"]))
        assert np.array_equal(clips[digit], prepare_clip(raw, ESPEAK_RATE, 8000, clip_samples()))
    # Different words really differ, and each clip ends in silence (the word fits in 0.64 s).
    assert not np.allclose(clips[0], clips[7])
    assert np.abs(clips[:, 0, -80:]).max() < 0.02


def test_a_speakers_takes_do_not_depend_on_which_speakers_are_built():
    groups = speaker_split(0)
    both = spoken_digits_split("train", speakers=groups["train"][:2], takes_per_digit=1)
    alone = spoken_digits_split("train", speakers=groups["train"][1:2], takes_per_digit=1)
    assert np.array_equal(both[0][NUM_CLASSES:], alone[0]) and both[2][NUM_CLASSES:] == alone[2]
    with pytest.raises(ValueError, match="not in the train split"):
        spoken_digits_split("train", speakers=groups["test"][:1])


def test_shards_round_trip_with_their_speakers(spoken_digits_root):
    groups = speaker_split(0)
    train_x, train_y = load_split_arrays(read_index(spoken_digits_root, "train").path)
    test_x, test_y = load_split_arrays(read_index(spoken_digits_root, "test").path)
    assert train_x.shape == (60, 1, 5120) and test_x.shape == (30, 1, 5120)
    assert np.bincount(train_y, minlength=10).tolist() == [6] * 10
    index = read_index(spoken_digits_root, "test")
    assert index.metadata["sample_rate"] == 8000 and "espeak" in index.metadata["espeak_version"].lower()
    expected, labels, _ = spoken_digits_split("test", speakers=groups["test"][:1])
    assert np.array_equal(test_x, expected) and np.array_equal(test_y, labels)


def test_waveform_time_shift_moves_each_clip_by_its_own_offset():
    audio = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10) + 1
    shifted = random_shift(audio, 2, torch.Generator().manual_seed(3), fill=0.0)
    offsets = torch.randint(0, 5, (2,), generator=torch.Generator().manual_seed(3)) - 2
    for clip, moved, offset in zip(audio, shifted, offsets.tolist()):
        expected = torch.zeros_like(clip)
        if offset >= 0:  # window starts `offset` samples later: content moves left
            expected[:, :10 - offset] = clip[:, offset:]
        else:
            expected[:, -offset:] = clip[:, :10 + offset]
        assert torch.equal(moved, expected)


def test_spectrogram_evaluator_takes_log_magnitudes_and_learns_tones():
    net = SpectrogramClassifierCNN(num_classes=2, samples=1024, channels=(4, 8), n_fft=128, hop=64)
    audio = torch.randn(3, 1, 1024) * 0.3
    spectrum = torch.stft(audio[:, 0], 128, 64, window=torch.hann_window(128), return_complex=True)
    expected = ((spectrum.abs() + 1e-3).log() + 1.5) / 4.0
    assert torch.allclose(net.spectrogram(audio)[:, 0], expected, atol=1e-6)
    assert net.features(audio).shape == (3, 8)
    with pytest.raises(ValueError, match=r"waveforms \(B, 1, 1024\)"):
        net.features(torch.zeros(2, 1, 1000))

    # Low tones vs high tones at random phases: a separable task the network must learn.
    generator = torch.Generator().manual_seed(0)
    time = torch.arange(1024) / 8000
    labels = torch.arange(64) % 2
    freqs = torch.where(labels == 0, 300.0, 2500.0) + 200 * torch.rand(64, generator=generator)
    phases = 6.28 * torch.rand(64, generator=generator)
    tones = (0.5 * torch.sin(2 * math.pi * freqs[:, None] * time + phases[:, None]))[:, None]
    metrics = fit_classifier(net, tones, labels, generator=generator, steps=60, batch_size=16, max_shift=50)
    assert metrics["train_accuracy"] == 1.0


def test_audio_samples_are_a_spectrogram_grid_and_a_wav(tmp_path):
    audio = torch.sin(torch.arange(4 * 800, dtype=torch.float32).reshape(4, 1, 800)) * 0.5
    png, wav_path = save_sample_grid(audio, tmp_path / "step-1.png", nrow=2, value_range=(-1.0, 1.0), sample_rate=8000)
    assert png.suffix == ".png" and wav_path == tmp_path / "step-1.wav"
    images = spectrogram_images(audio)
    assert images.shape == (4, 1, 129, 800 // 64 + 1) and 0 <= float(images.min()) and float(images.max()) <= 1
    with wave.open(str(wav_path)) as handle:
        assert handle.getframerate() == 8000 and handle.getnchannels() == 1
        pcm = np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    gap = 2000  # 0.25 s of silence after each sample
    assert pcm.size == 4 * (800 + gap)
    expected = np.concatenate([np.concatenate([clip[0].numpy(), np.zeros(gap)]) for clip in audio])
    np.testing.assert_allclose(pcm / 32767, expected, atol=1 / 32767)
    # Without a sample rate only the picture; images still give one grid.
    assert save_sample_grid(audio, tmp_path / "b.png", 2, (-1.0, 1.0)) == [tmp_path / "b.png"]
    assert save_sample_grid(torch.rand(4, 1, 8, 8), tmp_path / "c.png", 2) == [tmp_path / "c.png"]


def test_cli_builds_spoken_digits_and_rejects_options_of_other_datasets(tmp_path, capsys):
    from selfflow.platform.cli import main

    assert main(["data", "digits", "--out", str(tmp_path / "d"), "--sample-rate", "8000"]) != 0
    assert "spoken_digits" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
