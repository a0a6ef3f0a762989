"""Metrics of the evaluation suite: Fréchet distance, sample quality, probes, stratified loss,
the evaluator network and its cache."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from selfflow.components.core import BackboneOutput
from selfflow.components.metrics.evaluator import (
    DigitClassifierCNN,
    accuracy,
    batched_outputs,
    fit_classifier,
    random_shift,
)
from selfflow.components.metrics.frechet import FrechetDistance, frechet_distance, frechet_distance_infinity
from selfflow.components.metrics.probes import (
    knn_probe_accuracy,
    linear_probe_accuracy,
    pooled_hidden_states,
    probe_backbone,
)
from selfflow.components.metrics.sample_quality import class_accuracy, knn_precision_recall
from selfflow.components.metrics.stratified import bucket_edges, bucketize_losses, stratified_flow_loss

torch.set_num_threads(1)


# ---- Fréchet distance ------------------------------------------------------------------------


def with_moments(mean: np.ndarray, cov: np.ndarray, count: int, seed: int) -> torch.Tensor:
    """`count` points whose sample mean and (unbiased) sample covariance are exactly mean, cov."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(count, mean.shape[0]))
    z -= z.mean(axis=0)
    whiten = np.linalg.cholesky(np.atleast_2d(np.cov(z, rowvar=False)))
    z = z @ np.linalg.inv(whiten).T  # sample covariance now I
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def closed_form_fd(mean_a, cov_a, mean_b, cov_b) -> float:
    root_a = scipy.linalg.sqrtm(cov_a).real
    cross = scipy.linalg.sqrtm(root_a @ cov_b @ root_a).real
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * cross))


def random_cov(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_fd_of_two_gaussians_matches_the_closed_form():
    dim = 5
    mean_a, mean_b = np.zeros(dim), np.linspace(-1.0, 2.0, dim)
    cov_a, cov_b = random_cov(dim, 1), random_cov(dim, 2)  # do not commute
    assert not np.allclose(cov_a @ cov_b, cov_b @ cov_a)
    features_a = with_moments(mean_a, cov_a, 400, seed=3)
    features_b = with_moments(mean_b, cov_b, 300, seed=4)
    expected = closed_form_fd(mean_a, cov_a, mean_b, cov_b)
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-5)
    assert frechet_distance(features_b, features_a) == pytest.approx(expected, rel=1e-5)


def test_fd_of_one_dimensional_gaussians():
    # (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2 for 1-D Gaussians.
    a = with_moments(np.array([1.0]), np.array([[4.0]]), 50, seed=0)
    b = with_moments(np.array([-2.0]), np.array([[9.0]]), 80, seed=1)
    assert frechet_distance(a, b) == pytest.approx(3.0 ** 2 + (2.0 - 3.0) ** 2, rel=1e-6)


def test_fd_of_identical_feature_sets_is_about_zero_and_a_shift_costs_its_square():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(features, features.clone())) < 1e-6
    shift = torch.linspace(0.5, 1.0, 8)
    assert frechet_distance(features, features + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)


def test_fd_keeps_its_reference_across_candidates():
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(100, 4, generator=generator)
    near, far = torch.randn(100, 4, generator=generator), torch.randn(100, 4, generator=generator) + 3.0
    metric = FrechetDistance(reference)
    first_near, first_far, again_near = metric(near), metric(far), metric(near)
    assert first_near == pytest.approx(again_near)
    assert first_far > first_near + 30.0
    assert first_far == pytest.approx(frechet_distance(reference, far), rel=1e-6)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(1, 4), "M >= 2"),
    (torch.zeros(5, 3), "3 features"),
    (torch.full((5, 4), float("nan")), "non-finite"),
])
def test_fd_rejects_bad_features(bad, message):
    metric = FrechetDistance(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=message):
        metric(bad)


# ---- sample quality --------------------------------------------------------------------------


def test_fd_infinity_removes_the_small_sample_bias():
    """Candidates N(m, s^2 I) against a large N(0, I) reference: the true FD is
    |m|^2 + sum(1 + s^2 - 2 s). The FD of K candidates overshoots it by about slope / K, with a slope
    that grows with the candidates' spread (so two samplers compared at small K can swap order);
    the extrapolated FD_inf lands much nearer the truth than the FD of 500 candidates."""
    dims = 32
    reference = torch.randn(200_000, dims, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    distance = FrechetDistance(reference)
    mean = torch.full((dims,), 0.05, dtype=torch.float64)
    slopes = []
    for scale in (0.7, 1.4):
        truth = float(mean.square().sum() + dims * (1 + scale ** 2 - 2 * scale))
        noise = torch.randn(2000, dims, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        candidates = mean + scale * noise
        small = distance(candidates[:500])
        fd_inf, slope = frechet_distance_infinity(distance, candidates, torch.Generator().manual_seed(0))
        assert small - truth > 0.2, (scale, small, truth)  # the bias the extrapolation must remove
        assert abs(fd_inf - truth) < 0.35 * (small - truth), (scale, small, fd_inf, truth)
        slopes.append(slope)
    assert 0 < slopes[0] < slopes[1], slopes
    with pytest.raises(ValueError, match="num_sizes >= 2"):
        frechet_distance_infinity(distance, candidates, torch.Generator(), num_sizes=1)


def test_class_accuracy_counts_argmax_hits():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0], [0.0, 1.0]])
    assert class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="logits"):
        class_accuracy(logits, torch.tensor([0, 1]))


def test_precision_recall_identical_and_disjoint_sets():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(60, 3, generator=generator)
    assert knn_precision_recall(real, real.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert knn_precision_recall(real, real + 100.0, k=3) == {"precision": 0.0, "recall": 0.0}
    # A generator that collapses onto a tight cluster inside the data: precise, but no coverage.
    collapsed = 0.01 * torch.randn(60, 3, generator=generator)
    result = knn_precision_recall(real, collapsed, k=3)
    assert result["precision"] == 1.0 and result["recall"] < 0.3


# ---- probes ----------------------------------------------------------------------------------


def separable_set(count: int, seed: int, classes: int = 4, dim: int = 12):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (count,), generator=generator)
    centres = 4.0 * torch.eye(classes, dim)
    return centres[labels] + 0.5 * torch.randn(count, dim, generator=generator), labels


def test_probes_on_a_linearly_separable_set_are_about_perfect():
    train_x, train_y = separable_set(300, seed=0)
    test_x, test_y = separable_set(120, seed=1)
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) >= 0.98
    assert knn_probe_accuracy(train_x, train_y, test_x, test_y, k=5) >= 0.98
    # Two uninformative dimensions of huge scale (hidden states have such outliers) must not swamp
    # the cosine: the kNN probe standardises first (raw cosine kNN scores about 0.55 here).
    generator = torch.Generator().manual_seed(3)
    loud_train = torch.cat([train_x, 100 * torch.randn(300, 2, generator=generator)], dim=1)
    loud_test = torch.cat([test_x, 100 * torch.randn(120, 2, generator=generator)], dim=1)
    assert knn_probe_accuracy(loud_train, train_y, loud_test, test_y, k=5) >= 0.98


def test_probes_on_shuffled_labels_are_near_chance():
    train_x, train_y = separable_set(400, seed=0)
    test_x, test_y = separable_set(400, seed=1)
    shuffled = train_y[torch.randperm(400, generator=torch.Generator().manual_seed(2))]
    # 4 classes: chance is 0.25; the std of a 400-item accuracy is about 0.02.
    assert abs(linear_probe_accuracy(train_x, shuffled, test_x, test_y) - 0.25) < 0.1
    assert abs(knn_probe_accuracy(train_x, shuffled, test_x, test_y, k=10) - 0.25) < 0.1


def test_probe_rejects_bad_input():
    x, y = separable_set(20, seed=0)
    with pytest.raises(ValueError, match="labels"):
        linear_probe_accuracy(x, y[:5], x, y)
    with pytest.raises(ValueError, match="k must be"):
        knn_probe_accuracy(x, y, x, y, k=0)


class RecordingBackbone(nn.Module):
    """A 2-block stand-in for a DiT: block k output = k * (x_t @ W) + label embedding."""

    depth, hidden_dim, num_classes = 2, 3, 5

    def __init__(self):
        super().__init__()
        self.weight = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
        self.seen_cond = []

    def forward(self, x, t, cond, *, return_layers=(), stop_at=None):
        self.seen_cond.append(cond.clone())
        base = x @ self.weight + cond.float()[:, None, None]
        hidden = {k: k * base for k in set(return_layers) | ({stop_at} if stop_at else set())}
        return BackboneOutput(velocity=None if stop_at else x, hidden=hidden)


def test_pooled_hidden_states_mean_pool_noised_tokens_with_the_null_class():
    model = RecordingBackbone()
    tokens = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(0))
    pooled = pooled_hidden_states(model, tokens, 0.25, [1, 2], torch.Generator().manual_seed(7), batch_size=4)
    # Re-derive: the function draws eps per batch (4 then 2) from the generator.
    generator = torch.Generator().manual_seed(7)
    expected = []
    for start in (0, 4):
        x0 = tokens[start:start + 4]
        eps = torch.randn(x0.shape, generator=generator)
        x_t = 0.75 * x0 + 0.25 * eps
        expected.append((x_t @ model.weight + model.num_classes).mean(dim=1))
    expected = torch.cat(expected)
    torch.testing.assert_close(pooled[1], expected)
    torch.testing.assert_close(pooled[2], 2 * expected)
    assert all(bool((cond == model.num_classes).all()) for cond in model.seen_cond)


def test_probe_backbone_fills_a_block_by_level_table():
    from selfflow.components.backbones.dit import DiT

    torch.manual_seed(0)
    model = DiT(in_dim=4, grid=(2, 2), hidden_dim=16, depth=3, num_heads=2, num_classes=3)
    train_x, train_y = separable_set(60, seed=0, classes=3, dim=16)
    test_x, test_y = separable_set(30, seed=1, classes=3, dim=16)
    results = probe_backbone(model, train_x.reshape(60, 4, 4), train_y, test_x.reshape(30, 4, 4), test_y,
                             levels=(0.0, 0.5), knn_k=3)
    assert results.blocks == [1, 2, 3] and results.levels == [0.0, 0.5]
    assert results.linear.shape == (3, 2) and results.knn.shape == (3, 2)
    accuracy_, block, level = results.best("linear")
    assert accuracy_ == results.linear.max() and block in (1, 2, 3) and level in (0.0, 0.5)


# ---- stratified loss -------------------------------------------------------------------------


def test_bucket_edges_cover_the_unit_interval():
    edges = bucket_edges(10)
    assert edges[0] == 0.0 and edges[-1] == 1.0 and len(edges) == 11
    torch.testing.assert_close(edges[1:] - edges[:-1], torch.full((10,), 0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_buckets"):
        bucket_edges(0)


def test_bucketize_assigns_edges_and_weighted_mean_equals_overall():
    t = torch.tensor([0.0, 0.05, 0.1, 0.55, 0.999, 1.0, 0.3])
    losses = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 2.0])
    result = bucketize_losses(t, losses, 10)
    assert result.counts.tolist() == [2, 1, 0, 1, 0, 1, 0, 0, 0, 2]
    assert result.means[0] == 2.0 and result.means[9] == 10.0 and torch.isnan(result.means[2])
    filled = result.counts > 0
    weighted = (result.means[filled] * result.counts[filled]).sum() / result.counts.sum()
    assert float(weighted) == pytest.approx(result.overall) and result.overall == pytest.approx(float(losses.mean()))
    with pytest.raises(ValueError, match="levels"):
        bucketize_losses(torch.tensor([1.5]), torch.tensor([1.0]), 10)


class IdentityVelocity(nn.Module):
    num_classes = 0

    def forward(self, x, t, cond):
        return BackboneOutput(velocity=2.0 * x)


def test_stratified_flow_loss_re_derived_and_consistent():
    tokens = torch.randn(7, 3, 2, generator=torch.Generator().manual_seed(0))
    result = stratified_flow_loss(IdentityVelocity(), tokens, None, torch.Generator().manual_seed(5),
                                  num_buckets=4, draws_per_bucket=2, batch_size=3)
    generator = torch.Generator().manual_seed(5)
    expected_means = []
    for bucket in range(4):
        per_draw = []
        for _ in range(2):
            t = bucket / 4 + 0.25 * torch.rand(7, generator=generator)
            eps = torch.randn(tokens.shape, generator=generator)
            x_t = (1 - t[:, None, None]) * tokens + t[:, None, None] * eps
            per_draw.append((2.0 * x_t - (eps - tokens)).square().mean(dim=(1, 2)))
        expected_means.append(torch.cat(per_draw).mean())
    expected = torch.stack(expected_means).double()
    assert result.counts.tolist() == [14, 14, 14, 14]  # each draw landed in its own bucket
    torch.testing.assert_close(result.means, expected, rtol=1e-5, atol=1e-6)
    assert result.overall == pytest.approx(float(expected.mean()), rel=1e-5)


# ---- evaluator network -----------------------------------------------------------------------


def two_class_images(count: int, seed: int):
    """Class 0: bright top half, class 1: bright bottom half, plus noise; values in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(2, (count,), generator=generator)
    images = 0.2 * torch.rand(count, 1, 8, 8, generator=generator)
    images[labels == 0, :, :4] += 0.7
    images[labels == 1, :, 4:] += 0.7
    return images, labels


def test_evaluator_is_a_cnn_not_the_repa_encoder_and_learns():
    from selfflow.components.encoders.digit_encoder import DigitEncoder

    model = DigitClassifierCNN(num_classes=2, channels=(8, 16), seed=0)
    assert not isinstance(model, DigitEncoder)
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) for m in model.modules())
    images, labels = two_class_images(200, seed=0)
    features, logits = batched_outputs(model, images, batch_size=64)
    assert features.shape == (200, 16) and logits.shape == (200, 2)
    fit_classifier(model, images, labels, generator=torch.Generator().manual_seed(0), steps=60, batch_size=32)
    test_images, test_labels = two_class_images(100, seed=1)
    assert accuracy(model, test_images, test_labels) >= 0.95
    assert not any(p.requires_grad for p in model.parameters())


def test_evaluator_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = DigitClassifierCNN(seed=3), DigitClassifierCNN(seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="images"):
        a.features(torch.zeros(2, 1, 9, 9))


def test_random_shift_translates_each_image():
    images = torch.zeros(5, 1, 6, 6)
    images[:, :, 2:4, 2:4] = torch.arange(1, 6, dtype=torch.float32)[:, None, None, None]
    assert torch.equal(random_shift(images, 0, torch.Generator()), images)
    shifted = random_shift(images, 1, torch.Generator().manual_seed(0), fill=0.0)
    for original, moved in zip(images, shifted):
        candidates = [torch.roll(original, (dy, dx), dims=(1, 2)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.equal(moved, c) for c in candidates)  # content away from borders: a roll


# ---- evaluator cache and suite helpers -------------------------------------------------------


def tiny_eval_data():
    from selfflow.platform.evaluate.eval_data import EvalData

    train_x, train_y = two_class_images(64, seed=0)
    test_x, test_y = two_class_images(32, seed=1)
    return EvalData(train_x, train_y, test_x, test_y, train_x, test_x, num_classes=2, data_range=(0.0, 1.0),
                    fingerprint={"train_arrays": "a", "test_arrays": "b"})


def test_evaluator_is_cached_by_content_hash(tmp_path):
    from selfflow.platform.evaluate.evaluators import ClassifierEvaluator

    data = tiny_eval_data()
    recipe = ClassifierEvaluator(channels=(4, 8), steps=3, batch_size=16)
    first = recipe.load_or_fit(data, tmp_path)
    assert first.fitted_now and first.path == tmp_path / f"{first.key}.pt" and first.path.is_file()
    again = ClassifierEvaluator(channels=(4, 8), steps=3, batch_size=16).load_or_fit(data, tmp_path)
    assert not again.fitted_now and again.key == first.key
    assert all(torch.equal(p, q) for p, q in zip(first.network.state_dict().values(),
                                                 again.network.state_dict().values()))
    other_recipe = ClassifierEvaluator(channels=(4, 8), steps=4, batch_size=16).load_or_fit(data, tmp_path)
    data.fingerprint["test_arrays"] = "changed"
    other_data = recipe.load_or_fit(data, tmp_path)
    assert len({first.key, other_recipe.key, other_data.key}) == 3
    # A torn or foreign file is not trusted: the evaluator is trained again.
    first.path.write_bytes(b"not a checkpoint")
    data.fingerprint["test_arrays"] = "b"
    assert recipe.load_or_fit(data, tmp_path).fitted_now


def test_generation_labels_follow_the_test_split():
    from selfflow.platform.evaluate.eval_data import generation_labels

    test_labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 20)
    same = generation_labels(test_labels, 60, seed=0)
    assert torch.equal(torch.bincount(same), torch.bincount(test_labels))
    assert torch.equal(generation_labels(test_labels, 60, seed=0), same)
    doubled = generation_labels(test_labels, 120, seed=0)
    assert torch.equal(torch.bincount(doubled), 2 * torch.bincount(test_labels))


def test_eval_callback_cadence():
    from selfflow.platform.evaluate.suite import EvalSuite

    suite = EvalSuite(every=30, min_steps=50)
    due = [step for step in range(1, 101) if suite.due(step, 100, default_every=0)]
    assert due == [30, 60, 90, 100]
    assert not any(suite.due(step, 10, default_every=5) for step in range(1, 11))  # a smoke run
    follows_train = EvalSuite(every=None, min_steps=0)
    assert [s for s in range(1, 21) if follows_train.due(s, 20, default_every=8)] == [8, 16, 20]


def test_eval_suite_rejects_bad_settings():
    from selfflow.platform.errors import ConfigError
    from selfflow.platform.evaluate.suite import EvalSuite

    with pytest.raises(ConfigError, match="num_samples"):
        EvalSuite(num_samples=1)
    with pytest.raises(ConfigError, match="probe_levels"):
        EvalSuite(probe_levels=(0.0, 1.5))


# ---- Inception (ImageNet scale): local weights only -----------------------------------------


def test_inception_features_need_a_local_weights_file(tmp_path):
    from selfflow.components.metrics.inception import InceptionFeatures

    with pytest.raises(FileNotFoundError, match="never downloaded"):
        InceptionFeatures(tmp_path / "missing.pth", "torchvision")
    (tmp_path / "w.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="flavour"):
        InceptionFeatures(tmp_path / "w.pth", "tf")


def test_plots_are_written_atomically(tmp_path):
    from PIL import Image

    from selfflow.components.metrics.plots import plot_loss_by_t, plot_probe_heatmap
    from selfflow.components.metrics.probes import ProbeResults

    losses = bucketize_losses(torch.linspace(0, 1, 50), torch.linspace(2, 1, 50), 10)
    probes = ProbeResults(blocks=[1, 2, 3], levels=[0.0, 0.5], linear=np.full((3, 2), 0.5), knn=None)
    for path in (plot_loss_by_t(losses, tmp_path / "loss.png", step=7),
                 plot_probe_heatmap(probes, tmp_path / "probes.png", step=7)):
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "probes.png"]
