"""Small real datasets that work offline (no downloads at run time)."""
from selfflow.components.datasets.digits import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    SPLITS,
    digits_split_indices,
    load_digits_split,
)

__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "SPLITS", "digits_split_indices", "load_digits_split"]
