"""Moving digits: every frame is the real glyph at the position a bouncing path predicts."""
import numpy as np
import pytest
import torch

from selfflow.components.datasets.digits import digits_split_indices, load_digits_split
from selfflow.components.datasets.moving_digits import bounce, clip_shape, moving_digits_split, render_clip


def simulate_bounce(start, velocity, frames, span):
    """A ball stepping one pixel at a time and turning round at 0 and span: the path by hand."""
    position, direction, path = list(start), [int(np.sign(v)) for v in velocity], []
    for _ in range(frames):
        path.append(tuple(position))
        for axis in range(2):
            for _ in range(abs(velocity[axis])):
                if not 0 <= position[axis] + direction[axis] <= span:
                    direction[axis] = -direction[axis]
                position[axis] += direction[axis]
    return np.array(path)


@pytest.mark.parametrize("start, velocity", [((0, 8), (2, -1)), ((7, 3), (1, 2)), ((4, 4), (0, -2)), ((8, 0), (-2, 2))])
def test_bounce_matches_a_step_by_step_simulation(start, velocity):
    expected = simulate_bounce(start, velocity, frames=20, span=8)
    assert np.array_equal(bounce(np.array(start), np.array(velocity), 20, 8), expected)


def test_render_pastes_the_glyph_at_each_position():
    glyph = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    positions = np.array([[0, 0], [3, 5], [8, 8]])
    frames = render_clip(glyph, positions, canvas=16)
    for frame, (row, col) in zip(frames, positions):
        assert np.array_equal(frame[row:row + 8, col:col + 8], glyph)
        outside = frame.copy()
        outside[row:row + 8, col:col + 8] = 0
        assert not outside.any()


def test_clips_are_real_glyphs_on_their_recorded_paths():
    clips, labels, motion = moving_digits_split("test", clips_per_glyph=2)
    glyphs, glyph_labels = load_digits_split("test")
    assert clips.shape == (2 * len(glyphs), *clip_shape()) and clips.dtype == np.float32
    assert np.array_equal(labels, np.repeat(glyph_labels, 2))
    assert 0.0 <= clips.min() and clips.max() <= 1.0
    for n in range(0, len(clips), 97):
        start, velocity = motion[n, :2], motion[n, 2:]
        assert velocity.any() and np.abs(velocity).max() <= 2  # every glyph moves, at most 2 px a frame
        path = simulate_bounce(tuple(start), tuple(velocity), 8, 8)
        assert np.array_equal(clips[n, 0], render_clip(glyphs[n // 2, 0], path, 16))


def test_splits_use_disjoint_glyphs_and_are_deterministic():
    indices = digits_split_indices(0)
    assert not set(indices["train"]) & set(indices["test"])
    first, second = moving_digits_split("test", seed=0), moving_digits_split("test", seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    other = moving_digits_split("test", seed=1)
    assert not np.array_equal(first[2], other[2])


@pytest.mark.parametrize("kwargs, message", [
    ({"canvas": 8}, "canvas must be an int >= 9"),
    ({"frames": 1}, "frames must be an int >= 2"),
    ({"clips_per_glyph": 0}, "clips_per_glyph must be an int >= 1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        moving_digits_split("train", **kwargs)


def test_shards_hold_the_generated_clips(moving_digits_root):
    from selfflow.platform.data.sources import ShardData

    data = ShardData(root=str(moving_digits_root), num_classes=10, data_shape=clip_shape(), dataset="moving_digits")
    stored, stored_labels = data.arrays("test")
    clips, labels, _ = moving_digits_split("test")
    assert np.array_equal(stored, clips) and np.array_equal(stored_labels, labels)
    batch = next(iter(data.loader(batch_size=4, seed=0)))
    assert tuple(batch["x"].shape) == (4, *clip_shape())


def test_clip_evaluator_features_and_one_shift_per_clip():
    from selfflow.components.metrics.evaluator import ClipClassifierCNN, random_shift

    clips = torch.from_numpy(moving_digits_split("test")[0][:6])
    net = ClipClassifierCNN(channels=(4, 8))
    assert net.features(clips).shape == (6, 8) and net(clips).shape == (6, 10)
    with pytest.raises(ValueError, match="evaluator takes clips"):
        net.features(clips[:, :, :4])
    shifted = random_shift(clips, 2, torch.Generator().manual_seed(0))
    for clip, moved in zip(clips, shifted):  # the whole clip moves by one offset: frame 0 tells it
        offsets = [(dr, dc) for dr in range(-2, 3) for dc in range(-2, 3)
                   if torch.equal(torch.roll(clip, (dr, dc), dims=(-2, -1))[..., 2:-2, 2:-2], moved[..., 2:-2, 2:-2])]
        assert offsets, "each clip is one translation of itself"


def test_film_strips_put_frames_side_by_side():
    from selfflow.platform.evaluate.media import film_strips

    clips = torch.rand(2, 1, 3, 4, 5)
    strips = film_strips(clips, gap_value=-1.0)
    assert strips.shape == (2, 1, 4, 3 * 6 - 1)
    for frame in range(3):
        assert torch.equal(strips[..., frame * 6:frame * 6 + 5], clips[:, :, frame])
    assert (strips[..., 5] == -1).all() and (strips[..., 11] == -1).all()
