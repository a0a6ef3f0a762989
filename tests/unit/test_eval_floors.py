"""The two floors of the evaluation suite: real train images (data floor) and the same images after
the tokenizer's round trip (tokenizer floor), re-derived from the Fréchet formula on the features."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from selfflow.components.metrics.frechet import FrechetDistance
from selfflow.components.tokenizers.pixels import PixelTokenizer
from selfflow.platform.evaluate.eval_data import EvalData
from selfflow.platform.evaluate.suite import EvalContext, EvalSuite


class Flatten(nn.Module):
    """The evaluator's features are the pixels themselves (no head: no logits)."""

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double()


class Quantised(PixelTokenizer):
    """A lossy tokenizer: decode rounds every pixel to 0 or 1."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().decode(tokens).round()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def context_of(train: torch.Tensor, test: torch.Tensor) -> EvalContext:
    data = EvalData(train_x=train, train_y=torch.zeros(len(train), dtype=torch.long), test_x=test,
                    test_y=torch.zeros(len(test), dtype=torch.long), train_images=train, test_images=test,
                    num_classes=1, data_range=(0.0, 1.0), fingerprint={})
    evaluator = type("Loaded", (), {"network": Flatten()})()
    test_features = Flatten().features(test)
    return EvalContext(data, evaluator, FrechetDistance(test_features), test_features, {})


@pytest.mark.parametrize("tokenizer_class, lossless", [(PixelTokenizer, True), (Quantised, False)])
def test_tokenizer_floor_is_the_fd_of_round_tripped_train_images(tokenizer_class, lossless):
    generator = torch.Generator().manual_seed(0)
    train, test = torch.rand(300, 1, 2, 2, generator=generator), torch.rand(200, 1, 2, 2, generator=generator)
    tokenizer = tokenizer_class(data_shape=(1, 2, 2), patch_size=1, data_range=(0.0, 1.0))
    suite, context = EvalSuite(), context_of(train, test)
    count = 120
    index = suite._floor_index(context, count)
    round_trip = tokenizer.decode(tokenizer.encode(train[index])).clamp(0, 1)
    expected = frechet(round_trip.flatten(1).double().numpy(), test.flatten(1).double().numpy())
    floor = suite.tokenizer_floor(tokenizer, context, count)
    assert floor == pytest.approx(expected, rel=1e-4)
    data_floor = suite.data_floor(context, count)
    if lossless:
        assert floor == pytest.approx(data_floor, rel=1e-5)
    else:
        assert floor > 10 * data_floor
    assert suite.tokenizer_floor(tokenizer, context, count) == floor  # cached per count
