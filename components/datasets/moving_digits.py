"""Moving digits: short clips of a real 8x8 handwritten digit gliding across a larger canvas.

Each clip takes one glyph of scikit-learn's digits (the digits split decides which glyphs a split
may use, so train and test clips never share a glyph), a start position and an integer velocity,
and moves the glyph one velocity step per frame, bouncing off the canvas edges. Integer steps keep
every frame a crisp copy of the glyph (no interpolation), so what a model must learn is where the
glyph is, frame after frame: appearance plus coherent motion.

Clips are (1, frames, canvas, canvas) float32 in [0, 1]; the label is the digit. Everything is a
pure function of (seed, test_fraction, clips_per_glyph, frames, canvas).
"""
from __future__ import annotations

import numpy as np

from selfflow.components.datasets.digits import IMAGE_SHAPE, NUM_CLASSES, SPLITS, load_digits_split

__all__ = ["NUM_CLASSES", "clip_shape", "bounce", "render_clip", "moving_digits_split"]

GLYPH = IMAGE_SHAPE[-1]
DEFAULT_FRAMES = 8
DEFAULT_CANVAS = 16
SPEEDS = (-2, -1, 0, 1, 2)  # pixels per frame on each axis; (0, 0) is excluded: every glyph moves


def clip_shape(frames: int = DEFAULT_FRAMES, canvas: int = DEFAULT_CANVAS) -> tuple[int, int, int, int]:
    return (1, frames, canvas, canvas)


def bounce(start: np.ndarray, velocity: np.ndarray, frames: int, span: int) -> np.ndarray:
    """Positions (frames, 2) of a point moving from `start` by `velocity` per frame inside [0, span],
    reflected at both ends (a triangle wave of period 2 * span)."""
    if span < 1:
        raise ValueError(f"the canvas must be larger than the glyph, got a travel span of {span}")
    raw = np.asarray(start)[None, :] + np.arange(frames)[:, None] * np.asarray(velocity)[None, :]
    folded = np.mod(raw, 2 * span)
    return np.where(folded <= span, folded, 2 * span - folded).astype(np.int64)


def render_clip(glyph: np.ndarray, positions: np.ndarray, canvas: int) -> np.ndarray:
    """(frames, canvas, canvas): the glyph pasted at each frame's (row, col) top-left position."""
    size = glyph.shape[-1]
    frames = np.zeros((positions.shape[0], canvas, canvas), dtype=np.float32)
    for frame, (row, col) in zip(frames, positions):
        frame[row:row + size, col:col + size] = glyph
    return frames


def _check(frames: int, canvas: int, clips_per_glyph: int) -> None:
    for name, value, low in (("frames", frames, 2), ("canvas", canvas, GLYPH + 1), ("clips_per_glyph", clips_per_glyph, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def moving_digits_split(
    split: str,
    seed: int = 0,
    test_fraction: float = 0.2,
    clips_per_glyph: int = 2,
    frames: int = DEFAULT_FRAMES,
    canvas: int = DEFAULT_CANVAS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clips (n, 1, frames, canvas, canvas) float32 in [0, 1], labels (n,) int64,
    motion (n, 4) int64: start row, start col, row velocity, col velocity) of one split.

    n = clips_per_glyph x the glyphs of that digits split; clip k of glyph i is row
    i * clips_per_glyph + k. Motions come from a generator seeded by (seed, split).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown moving digits split {split!r}; expected one of {SPLITS}")
    _check(frames, canvas, clips_per_glyph)
    glyphs, labels = load_digits_split(split, seed, test_fraction)
    rng = np.random.default_rng([int(seed), SPLITS.index(split), 0x6D6F76])  # 'mov': apart from other streams
    span = canvas - GLYPH
    count = glyphs.shape[0] * clips_per_glyph
    starts = rng.integers(0, span + 1, size=(count, 2))
    velocities = np.array([(a, b) for a in SPEEDS for b in SPEEDS if (a, b) != (0, 0)])
    moves = velocities[rng.integers(0, velocities.shape[0], size=count)]
    clips = np.empty((count, *clip_shape(frames, canvas)), dtype=np.float32)
    for n in range(count):
        glyph = glyphs[n // clips_per_glyph, 0]
        clips[n, 0] = render_clip(glyph, bounce(starts[n], moves[n], frames, span), canvas)
    return clips, np.repeat(labels, clips_per_glyph), np.concatenate([starts, moves], axis=1).astype(np.int64)
