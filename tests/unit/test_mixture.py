"""Modality mixtures: the per-step modality draw, its resumable state, per-modality mask ratios,
per-key running means, and the one-line errors of a mis-bound mixture."""
from __future__ import annotations

import pytest
import torch

from selfflow.components.schedules.dual import DualTimestepScheduler
from selfflow.components.schedules.timesteps import UniformTime
from selfflow.platform.data.mixture import MixtureData
from selfflow.platform.errors import ConfigError
from selfflow.platform.evaluate.modalities import PrefixedTracker
from selfflow.platform.train.trainer import RunningMeans


class CountingLoader:
    """Batches {'x': [part index, batch number]} with a resumable position."""

    def __init__(self, tag: int):
        self.tag, self.position = tag, 0

    def __next__(self):
        self.position += 1
        return {"x": torch.tensor([self.tag, self.position]), "y": torch.tensor([0])}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class FakePart:
    def __init__(self, tag: int, num_classes: int = 10, dataset: str = "d"):
        self.tag, self.num_classes, self.dataset = tag, num_classes, dataset

    def loader(self, batch_size, seed, rank=0, world_size=1):
        return CountingLoader(self.tag)


def test_each_step_draws_its_modality_from_the_seeded_weights():
    data = MixtureData({"image": FakePart(0), "audio": FakePart(1)}, weights={"image": 3.0, "audio": 1.0})
    assert data.names == ("audio", "image")
    torch.testing.assert_close(data.probabilities, torch.tensor([0.25, 0.75], dtype=torch.float64))
    loader = data.loader(batch_size=4, seed=5)
    batches = [next(loader) for _ in range(400)]

    generator = torch.Generator().manual_seed(5 * 7919 + 17)  # the loader's documented seed rule
    expected = [("audio", "image")[int(torch.multinomial(torch.tensor([0.25, 0.75], dtype=torch.float64), 1,
                                                           generator=generator))] for _ in range(400)]
    assert [b["modality"] for b in batches] == expected
    assert 0.68 < expected.count("image") / 400 < 0.82
    # Each part advances only on its own steps: its batches are numbered 1, 2, 3, ...
    for name, tag in (("image", 0), ("audio", 1)):
        numbers = [int(b["x"][1]) for b in batches if b["modality"] == name]
        assert numbers == list(range(1, len(numbers) + 1)) and all(int(b["x"][0]) == tag
                                                                    for b in batches if b["modality"] == name)


def test_every_rank_draws_the_same_modality_sequence():
    data = MixtureData({"image": FakePart(0), "audio": FakePart(1)})
    ranks = [data.loader(batch_size=4, seed=2, rank=rank, world_size=2) for rank in (0, 1)]
    assert [next(ranks[0])["modality"] for _ in range(50)] == [next(ranks[1])["modality"] for _ in range(50)]


def test_resuming_continues_the_same_sequence():
    data = MixtureData({"image": FakePart(0), "audio": FakePart(1)})
    straight = data.loader(batch_size=4, seed=1)
    first = [next(straight) for _ in range(30)]
    state = straight.state_dict()
    rest = [next(straight) for _ in range(30)]

    resumed = data.loader(batch_size=4, seed=1)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(30)]
    assert [(b["modality"], b["x"].tolist()) for b in again] == [(b["modality"], b["x"].tolist()) for b in rest]
    assert first[0]["modality"] in ("audio", "image")
    with pytest.raises(ValueError, match="names parts"):
        MixtureData({"image": FakePart(0)}).loader(4, 1).load_state_dict(state)


def test_a_joint_step_takes_one_batch_of_every_modality_with_its_loss_weight():
    data = MixtureData({"image": FakePart(0), "audio": FakePart(1)}, weights={"image": 3.0, "audio": 1.0},
                       per_step="all")
    loader = data.loader(batch_size=4, seed=5)
    steps = [next(loader) for _ in range(5)]
    for number, step in enumerate(steps, start=1):
        assert [part["modality"] for part in step["parts"]] == ["audio", "image"]  # the mixture's name order
        assert [part["x"].tolist() for part in step["parts"]] == [[1, number], [0, number]]
        assert step["weights"] == [0.25, 0.75]
    state = loader.state_dict()
    after = [[part["x"].tolist() for part in next(loader)["parts"]] for _ in range(3)]
    resumed = data.loader(batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert [[part["x"].tolist() for part in next(resumed)["parts"]] for _ in range(3)] == after
    with pytest.raises(ValueError, match="written with MixtureData.per_step = 'all'"):
        MixtureData({"image": FakePart(0), "audio": FakePart(1)}).loader(4, 5).load_state_dict(state)
    with pytest.raises(ConfigError, match="MixtureData.per_step must be one of one, all, got 'both'"):
        MixtureData({"image": FakePart(0)}, per_step="both")


def test_mixture_data_refuses_bad_weights_and_class_counts():
    parts = {"image": FakePart(0), "audio": FakePart(1)}
    with pytest.raises(ConfigError, match="a weight to each of"):
        MixtureData(parts, weights={"image": 1.0})
    with pytest.raises(ConfigError, match="positive sum"):
        MixtureData(parts, weights={"image": 0.0, "audio": 0.0})
    with pytest.raises(ConfigError, match="positive sum"):
        MixtureData(parts, weights={"image": -1.0, "audio": 2.0})
    with pytest.raises(ConfigError, match="same number of classes"):
        MixtureData({"image": FakePart(0, num_classes=10), "audio": FakePart(1, num_classes=5)})
    with pytest.raises(ConfigError, match="must map modality names"):
        MixtureData({})
    data = MixtureData({"image": FakePart(0, dataset="digits"), "audio": FakePart(1, dataset="spoken_digits")})
    assert (data.dataset, data.modality, data.num_classes) == ("spoken_digits+digits", "mixture(audio+image)", 10)


def test_scheduler_uses_each_modalitys_mask_ratio():
    scheduler = DualTimestepScheduler(UniformTime(), mask_ratio=0.25, mask_ratio_by_modality={"audio": 0.5})
    for modality, ratio in ((None, 0.25), ("image", 0.25), ("audio", 0.5)):
        draws = scheduler.sample(3, 40, torch.Generator().manual_seed(4), modality=modality)
        replay = torch.Generator().manual_seed(4)  # draw order: t (B,), s (B,), then the mask's uniforms
        torch.rand(3, generator=replay), torch.rand(3, generator=replay)
        assert torch.equal(draws.mask, torch.rand(3, 40, generator=replay) < ratio)
    with pytest.raises(ValueError, match=r"mask_ratio_by_modality\['audio'\] must lie in \[0.0, 0.5\]"):
        DualTimestepScheduler(UniformTime(), mask_ratio_by_modality={"audio": 0.7})


def test_running_means_average_each_key_over_the_steps_that_logged_it():
    means = RunningMeans()
    means.add({"loss/flow": 1.0, "loss/image/flow": 1.0})
    means.add({"loss/flow": 3.0, "loss/audio/flow": 3.0})
    means.add({"loss/flow": 5.0, "loss/image/flow": 5.0})
    assert means.flush() == {"loss/flow": 3.0, "loss/image/flow": 3.0, "loss/audio/flow": 3.0}
    assert means.flush() == {}
    legacy = RunningMeans({"loss/flow": 6.0}, 3)  # a checkpoint from before per-key counts
    assert legacy.flush() == {"loss/flow": 2.0}


def test_prefixed_tracker_names_metrics_and_artifacts_by_modality():
    logged = []

    class Recorder:
        def log_metrics(self, metrics, step):
            logged.append((dict(metrics), step))

        def log_artifact(self, path, artifact_path=None):
            logged.append((path, artifact_path))

        def log_image(self, path, key, step):
            logged.append((path, key, step))

    tracker = PrefixedTracker(Recorder(), "audio")
    tracker.log_metrics({"eval/fd": 1.0, "probe/linear/best": 0.5, "plain": 2.0}, step=7)
    tracker.log_artifact("x.png", "eval")
    tracker.log_image("x.png", "eval/probe_heatmap", 7)
    assert logged == [({"eval/audio/fd": 1.0, "probe/audio/linear/best": 0.5, "audio/plain": 2.0}, 7),
                      ("x.png", "eval/audio"), ("x.png", "eval/audio/probe_heatmap", 7)]


@pytest.mark.parametrize("binding, message", [
    ("build_experiment.data = @ShardData()", "must be a @MixtureData"),
    ("build_experiment.backbone = @DiT", "needs a backbone that takes per-modality layouts"),
    ("build_experiment.evaluation = @EvalSuite()", "its own suite"),
    ("MixtureData.parts = {'image': @image/ShardData()}\nMixtureData.weights = None", "modalities differ"),
    ("build_experiment.objective = @REPAObjective", "REPAObjective works on one token layout"),
])
def test_a_mis_bound_mixture_fails_with_one_line(binding, message, in_tmp):
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin

    extra = ["DiT.hidden_dim = 96", "DiT.depth = 2", "DiT.num_heads = 4"] if "@DiT" in binding else []
    config.parse(["mixtures/digits_speech/fm.gin"], binding.splitlines() + extra)
    # On the meta device, as a config check builds: the spectrogram tokenizer then reads no shards.
    with pytest.raises(ConfigError, match=message) as error, torch.device("meta"):
        build_from_gin()
    assert "\n" not in str(error.value)


def test_data_parallel_wrapping_expects_a_mixtures_idle_modality_layers(tmp_path):
    """A mixture's step leaves the other modalities' layers without gradient; DDP (here one gloo rank)
    must be told, or its next step fails. ddp_wrapper tells it for mixture models only."""
    import torch.distributed as dist

    from selfflow.components.backbones import MultiModalDiT
    from selfflow.components.core import Batch
    from selfflow.components.objectives.flow_matching import FlowMatchingObjective
    from selfflow.components.schedules.timesteps import UniformTime
    from selfflow.platform.scale.ray_train import ddp_wrapper
    from selfflow.platform.train.trainer import TrainingModule

    def module() -> TrainingModule:
        model = MultiModalDiT({"image": (4, (4, 4)), "audio": (6, (10,))}, hidden_dim=16, depth=2, num_heads=2,
                              num_classes=3)
        return TrainingModule(model, FlowMatchingObjective(UniformTime(), num_classes=3))

    def two_steps(wrapped) -> None:
        generator = torch.Generator().manual_seed(0)
        for x in (torch.randn(2, 16, 4), torch.randn(2, 10, 6)):
            wrapped(Batch(x, torch.tensor([0, 1])), None, generator).total().backward()

    def joint_steps(wrapped) -> None:  # MixtureData.per_step = 'all': both modalities in one forward
        generator = torch.Generator().manual_seed(0)
        for _ in range(2):
            batches = [Batch(torch.randn(2, 16, 4), torch.tensor([0, 1])),
                       Batch(torch.randn(2, 10, 6), torch.tensor([2, 0]))]
            outs = wrapped(batches, None, generator)
            (0.5 * outs[0].total() + 0.5 * outs[1].total()).backward()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        two_steps(ddp_wrapper()(module()))
        joint_steps(ddp_wrapper()(module()))
        from torch.nn.parallel import DistributedDataParallel

        with pytest.raises(RuntimeError, match="finished reduction"):
            two_steps(DistributedDataParallel(module()))  # what plain wrapping would do
    finally:
        dist.destroy_process_group()


def test_compare_shows_each_modalitys_metrics_by_default():
    from selfflow.platform.tracking.compare import default_metrics, without_modality

    present = {"loss/total", "loss/flow", "loss/audio/flow", "loss/image/flow", "eval/audio/fd", "eval/image/fd",
               "probe/image/linear/best", "probe_grid/linear/t0_block1", "eval/audio/fd_data_floor"}
    assert default_metrics(present) == ["loss/total", "loss/flow", "loss/audio/flow", "loss/image/flow",
                                        "eval/audio/fd", "eval/image/fd", "probe/image/linear/best"]
    assert default_metrics({"eval/fd", "loss/flow"}) == ["loss/flow", "eval/fd"]  # single modality: as before
    assert without_modality("eval/audio/fd") == "eval/fd" and without_modality("eval/fd") == "eval/fd"
