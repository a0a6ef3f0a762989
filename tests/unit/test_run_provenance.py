"""What a run records besides its losses: provenance tags, names, metric names by kind, dataset
inputs, sample media, system metrics, the demo's closing summary."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import torch

from selfflow.platform.tracking import provenance


def test_gin_header_is_the_leading_comment_block():
    text = "\n# Line one of the story.\n#   indented detail\n#\n# second paragraph\ninclude 'x.gin'\n# not header\n"
    assert provenance.gin_header(text) == "Line one of the story.\n  indented detail\n\nsecond paragraph"
    assert provenance.gin_header("include 'x.gin'\n# later\n") == ""


def test_source_tags_name_the_code_the_command_and_the_description():
    tags = provenance.source_tags(["digits/fm.gin"], ["TrainConfig.steps=5"], "about it",
                                  argv=["/venv/bin/selfflow", "train", "--gin_file", "digits/fm.gin"])
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == "selfflow train"
    assert tags["selfflow.command"] == "selfflow train --gin_file digits/fm.gin"
    assert tags["selfflow.gin_files"] == "digits/fm.gin" and tags["selfflow.gin_params"] == "TrainConfig.steps=5"
    assert tags["mlflow.note.content"] == "about it" and tags["mlflow.user"]
    assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])  # the tests run from a checkout
    described = provenance.describe("Header.", ["a.gin"], ["X.y = 1"])
    assert described == "Header.\n\n**gin files:** `a.gin`\n\n**overrides:** `X.y = 1`"


def test_run_names_are_readable_and_unique():
    names = {provenance.unique_run_name("digits_fm") for _ in range(20)}
    assert len(names) == 20 and all(re.fullmatch(r"digits_fm-[0-9a-f]{6}", name) for name in names)


def test_metric_names_by_kind():
    from selfflow.components.metrics.probes import ProbeResults
    from selfflow.components.metrics.stratified import bucketize_losses
    from selfflow.platform.evaluate.suite import bucket_name, loss_metrics, probe_metrics

    linear = np.array([[0.5, 0.7], [0.9, 0.6]])
    results = ProbeResults(blocks=[1, 2], levels=[0.0, 0.5], linear=linear, knn=linear / 2)
    names = probe_metrics(results)
    assert names["probe_grid/linear/t0.5_block1"] == 0.7 and names["probe_grid/knn/t0_block2"] == 0.45
    assert names["probe/linear/best"] == 0.9 and names["probe/linear/best_block"] == 2.0
    # Bucket i of n covers [i/n, (i+1)/n): named by those ends.
    t = torch.tensor([0.05, 0.4, 0.95])
    losses = loss_metrics(bucketize_losses(t, torch.tensor([1.0, 2.0, 3.0]), 3))
    assert losses == {"loss_by_t/t0.00-0.33": 1.0, "loss_by_t/t0.33-0.67": 2.0, "loss_by_t/t0.67-1.00": 3.0,
                      "loss_by_t/overall": 2.0}
    assert bucket_name(0.0, 0.01, 100) == "t0.000-0.010"


def test_sample_image_keys():
    from pathlib import Path

    from selfflow.platform.train.callbacks import sample_image_key

    assert sample_image_key(Path("step-00000100.png")) == "samples/grid"
    assert sample_image_key(Path("step-00000100-audio.png")) == "samples/audio"


def test_clips_get_a_film_strip_and_a_gif(tmp_path):
    from PIL import Image

    from selfflow.platform.evaluate.media import save_sample_grid

    clips = torch.rand(4, 1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    png, gif = save_sample_grid(clips, tmp_path / "step-1.png", nrow=2)
    assert gif == tmp_path / "step-1.gif"
    with Image.open(gif) as animation:
        assert animation.n_frames == 3
        animation.seek(1)
        frame = np.asarray(animation.convert("L"), dtype=np.float64)
    # Frame 1 is the 2x2 grid of every clip's frame 1, each 16x16 frame upscaled x2 (nearest), 2-pixel padding.
    expected = (clips[0, 0, 1] * 255).round().numpy().repeat(2, 0).repeat(2, 1)
    assert frame.shape == (2 + 2 * (32 + 2), 2 + 2 * (32 + 2))
    assert np.abs(frame[2:34, 2:34] - expected).max() <= 2  # GIF palette rounding
    assert not list(tmp_path.glob(".*"))


def test_system_metrics_sampler_averages_between_takes():
    pytest.importorskip("psutil")
    from selfflow.platform.tracking.system_metrics import SystemMetricsSampler

    with pytest.raises(ValueError, match="> 0 seconds"):
        SystemMetricsSampler(0)
    sampler = SystemMetricsSampler(3600.0)  # the thread will not sample during this test
    sampler.start()
    try:
        assert sampler.take() == {}
        sampler.sample()
        sampler.sample()
        taken = sampler.take()
        assert {"system/cpu_utilization_percentage", "system/process_cpu_percentage",
                "system/process_memory_rss_megabytes", "system/disk_usage_percentage"} <= set(taken)
        assert taken["system/process_memory_rss_megabytes"] > 0 and sampler.take() == {}
    finally:
        sampler.stop()


def test_dataset_inputs_name_source_and_digest_of_the_shard_index(digits_root):
    from selfflow.platform.data.sources import ShardData
    from selfflow.platform.train.run_tracking import dataset_inputs

    inputs = list(dataset_inputs(ShardData(root=str(digits_root), dataset="digits", num_classes=10)))
    assert [(d["name"], d["context"]) for d in inputs] == [("digits/train", "train"), ("digits/test", "eval")]
    for dataset, split in zip(inputs, ("train", "test")):
        index = digits_root / f"{split}.index.json"
        sha = hashlib.sha256(index.read_bytes()).hexdigest()
        assert dataset["digest"] == sha[:16] and json.loads(dataset["source"]) == {"uri": str(index.resolve())}
        profile = json.loads(dataset["profile"])
        assert profile["index_sha256"] == sha
        assert profile["samples"] == sum(s["count"] for s in json.loads(index.read_text())["shards"])


def test_demo_summary_prints_the_figures_that_matter():
    from selfflow.platform.cli import demo_summary

    lines = demo_summary({"eval/fd": 6.734, "eval/fd_data_floor": 2.8, "eval/sample_class_acc": 0.9125,
                          "probe/linear/best": 0.908, "probe/linear/best_block": 5.0, "loss/flow": 0.4})
    assert lines == ["FD:              6.73  (real-data floor 2.80; lower is better)",
                     "class accuracy:  0.912  (samples the evaluator reads as their requested digit)",
                     "best probe:      0.908  (linear probe accuracy, block 5)"]
    assert "none logged" in demo_summary({"loss/flow": 0.4})[0]
