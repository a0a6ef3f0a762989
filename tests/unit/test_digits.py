"""The digits dataset: seeded, stratified, disjoint split of sklearn's 1,797 images."""
import numpy as np
import pytest
from sklearn.datasets import load_digits

from selfflow.components.datasets.digits import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    digits_split_indices,
    load_digits_split,
)


def test_images_are_the_raw_pixels_divided_by_16():
    raw = load_digits()
    indices = digits_split_indices(seed=0)["train"]
    x, y = load_digits_split("train", seed=0)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (len(indices), *IMAGE_SHAPE) and IMAGE_SHAPE == (1, 8, 8)
    np.testing.assert_array_equal(x[:, 0], (raw.images[indices] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(y, raw.target[indices])
    assert x.min() == 0.0 and x.max() == 1.0


def test_split_is_a_pure_function_of_seed_and_fraction():
    first, second = digits_split_indices(3, 0.2), digits_split_indices(3, 0.2)
    for split in ("train", "test"):
        np.testing.assert_array_equal(first[split], second[split])
    other = digits_split_indices(4, 0.2)
    assert not np.array_equal(first["test"], other["test"])
    x_a, _ = load_digits_split("test", seed=3)
    x_b, _ = load_digits_split("test", seed=3)
    np.testing.assert_array_equal(x_a, x_b)


@pytest.mark.parametrize("seed,test_fraction", [(0, 0.2), (7, 0.3)])
def test_splits_are_disjoint_cover_everything_and_are_stratified(seed, test_fraction):
    indices = digits_split_indices(seed, test_fraction)
    train, test = indices["train"], indices["test"]
    assert len(train) + len(test) == 1797
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(1797))
    labels = load_digits().target
    per_class = np.bincount(labels, minlength=NUM_CLASSES)
    in_test = np.bincount(labels[test], minlength=NUM_CLASSES)
    # Stratified: every class keeps its share of the test split up to rounding.
    assert np.all(np.abs(in_test - test_fraction * per_class) <= 1.0)
    _, y_test = load_digits_split("test", seed, test_fraction)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=NUM_CLASSES), in_test)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="'validation'"):
        load_digits_split("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split("train", test_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        load_digits_split("train", seed=-1)
