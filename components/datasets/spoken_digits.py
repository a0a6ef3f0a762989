"""Spoken digits: the ten digit words spoken by Debian's `espeak-ng` in many voices, as short waveforms.

A speaker is an (accent, voice variant) pair of espeak-ng's built-in English voices (8 accents x 11
variants = 88 speakers). The speakers are split once by the seed, so train and test clips never
share a speaker. Every speaker says every digit `takes_per_digit` times, each take at its own
speaking rate and pitch drawn from the seed.

A clip is espeak-ng's 22.05 kHz output resampled to `sample_rate` (polyphase, scipy), started at the
word's onset (first sample above 2% of the peak, less 10 ms), scaled to a peak of 0.9, then cut or
zero-padded to `duration` seconds: (1, samples) float32 in [-1, 1], label = the digit. espeak-ng is
a deterministic formant synthesiser, so the data is a pure function of the arguments and the
installed espeak-ng (its version is recorded with the shards).
"""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["NUM_CLASSES", "WORDS", "SPEAKERS", "clip_samples", "speaker_split", "espeak_version",
           "synthesize", "prepare_clip", "spoken_digits_split"]

NUM_CLASSES = 10
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4")
SPEAKERS = tuple(f"{accent}+{variant}" for accent in ACCENTS for variant in VARIANTS)
RATES = (140, 200)  # words per minute, drawn uniformly per take: words last about 0.3 to 0.6 s
PITCHES = (30, 70)  # espeak-ng pitch (0-99, default 50), drawn uniformly per take
ESPEAK_RATE = 22050  # espeak-ng writes 16-bit mono wav at this rate
ONSET_FRACTION = 0.02
LEAD_SECONDS = 0.01
PEAK = 0.9
DEFAULT_SAMPLE_RATE = 8000
DEFAULT_DURATION = 0.64


def clip_samples(sample_rate: int = DEFAULT_SAMPLE_RATE, duration: float = DEFAULT_DURATION) -> int:
    samples = sample_rate * duration
    if abs(samples - round(samples)) > 1e-6 or round(samples) < 1:
        raise ValueError(f"duration {duration} s at {sample_rate} Hz must be a whole, positive number of samples")
    return int(round(samples))


def _executable() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError("espeak-ng is not installed: `apt-get install espeak-ng` (make install does it)")
    return path


def espeak_version() -> str:
    result = subprocess.run([_executable(), "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def speaker_split(seed: int = 0, test_fraction: float = 0.2) -> dict[str, tuple[str, ...]]:
    """{'train': speakers, 'test': speakers}: a seeded partition of SPEAKERS (disjoint)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(SPEAKERS))
    test_count = max(1, round(test_fraction * len(SPEAKERS)))
    return {"train": tuple(SPEAKERS[i] for i in sorted(order[test_count:])),
            "test": tuple(SPEAKERS[i] for i in sorted(order[:test_count]))}


def synthesize(word: str, speaker: str, rate: int, pitch: int) -> np.ndarray:
    """espeak-ng's waveform of `word` (int16, ESPEAK_RATE Hz)."""
    with tempfile.TemporaryDirectory(prefix="espeak-") as folder:
        path = Path(folder) / "word.wav"
        subprocess.run([_executable(), "-v", speaker, "-s", str(rate), "-p", str(pitch), "-w", str(path), word],
                       check=True, capture_output=True)
        with wave.open(str(path), "rb") as handle:
            if handle.getnchannels() != 1 or handle.getsampwidth() != 2:
                raise ValueError(f"espeak-ng wrote {handle.getnchannels()} channels of {handle.getsampwidth()} "
                                 f"bytes for {word!r} ({speaker}); expected 16-bit mono")
            if handle.getframerate() != ESPEAK_RATE:
                raise ValueError(f"espeak-ng wrote {handle.getframerate()} Hz, expected {ESPEAK_RATE}")
            return np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16).copy()


def prepare_clip(waveform: np.ndarray, source_rate: int, sample_rate: int, samples: int) -> np.ndarray:
    """Resample, start at the onset, scale to PEAK, cut or zero-pad to `samples`: (1, samples) float32."""
    from scipy.signal import resample_poly

    divisor = math.gcd(sample_rate, source_rate)
    audio = resample_poly(waveform.astype(np.float64) / 32768.0, sample_rate // divisor, source_rate // divisor)
    peak = np.abs(audio).max()
    if not peak > 0:
        raise ValueError("espeak-ng produced silence")
    onset = int(np.argmax(np.abs(audio) > ONSET_FRACTION * peak))
    audio = audio[max(0, onset - int(LEAD_SECONDS * sample_rate)):] * (PEAK / peak)
    clip = np.zeros(samples, dtype=np.float32)
    clip[:min(samples, audio.size)] = audio[:samples]
    return clip[None, :]


def _takes(seed: int, speakers: tuple[str, ...], takes_per_digit: int) -> list[tuple[str, int, int, int]]:
    """(speaker, digit, rate, pitch) of every clip, speaker-major; rates and pitches drawn per speaker
    from a generator seeded by (seed, speaker index), so a speaker's takes do not depend on the split."""
    takes = []
    for speaker in speakers:
        rng = np.random.default_rng([seed, SPEAKERS.index(speaker)])
        rates = rng.integers(RATES[0], RATES[1] + 1, size=(NUM_CLASSES, takes_per_digit))
        pitches = rng.integers(PITCHES[0], PITCHES[1] + 1, size=(NUM_CLASSES, takes_per_digit))
        takes += [(speaker, digit, int(rates[digit, n]), int(pitches[digit, n]))
                  for digit in range(NUM_CLASSES) for n in range(takes_per_digit)]
    return takes


def spoken_digits_split(
    split: str,
    seed: int = 0,
    test_fraction: float = 0.2,
    takes_per_digit: int = 3,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    duration: float = DEFAULT_DURATION,
    speakers: tuple[str, ...] | None = None,
    workers: int = 4,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(clips (M, 1, samples) float32, labels (M,) int64, per-clip {speaker, rate, pitch}) of one split.

    speakers: restrict the split to these of its speakers (tests use a few); None = all of them.
    workers: espeak-ng processes run side by side (the order of the result does not depend on it).
    """
    groups = speaker_split(seed, test_fraction)
    if split not in groups:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(takes_per_digit, bool) or not isinstance(takes_per_digit, int) or takes_per_digit < 1:
        raise ValueError(f"takes_per_digit must be a positive int, got {takes_per_digit!r}")
    chosen = groups[split]
    if speakers is not None:
        foreign = sorted(set(speakers) - set(chosen))
        if foreign:
            raise ValueError(f"speakers {foreign} are not in the {split} split")
        chosen = tuple(s for s in chosen if s in set(speakers))
    samples = clip_samples(sample_rate, duration)
    takes = _takes(seed, chosen, takes_per_digit)

    def render(take):
        speaker, digit, rate, pitch = take
        return prepare_clip(synthesize(WORDS[digit], speaker, rate, pitch), ESPEAK_RATE, sample_rate, samples)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        clips = list(pool.map(render, takes))
    labels = np.array([digit for _, digit, _, _ in takes], dtype=np.int64)
    info = [{"speaker": speaker, "rate": rate, "pitch": pitch} for speaker, _, rate, pitch in takes]
    return np.stack(clips), labels, info
