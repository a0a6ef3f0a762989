"""Video with the same code as images: a short moving-digits Self-Flow run trains on 3-D token grids,
evaluates with the clip evaluator into MLflow, and writes its samples as film strips."""
from __future__ import annotations

import math

import torch
from PIL import Image

from selfflow.platform.train.driver import train

STEPS = 12
SMALL = [
    f"TrainConfig.steps = {STEPS}",
    "TrainConfig.batch_size = 16",
    "TrainConfig.log_every = 4",
    "TrainConfig.checkpoint_every = 0",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 2",
    "EvalSuite.min_steps = 0",
    "EvalSuite.every = 0",
    "EvalSuite.num_samples = 30",
    "EvalSuite.sample_batch = 30",
    "EvalSuite.probe_levels = (0.0,)",
    "EvalSuite.probe_train_samples = 100",
    "EvalSuite.probe_test_samples = 60",
    "EvalSuite.loss_samples = 60",
    "EvalSuite.knn_k = 5",
    "ClassifierEvaluator.steps = 20",
]


def test_moving_digits_selfflow_trains_evaluates_and_draws(in_tmp, moving_digits_root):
    (in_tmp / "data" / "moving_digits").symlink_to(moving_digits_root)
    result = train(["video/selfflow.gin"], SMALL, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs", progress=False)

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=result.tracking_uri).get_run(result.mlflow_run_id)
    metrics = run.data.metrics
    assert {"loss/flow", "loss/rep", "eval/fd", "eval/sample_class_acc", "probe/linear/best"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("loss/flow", "loss/rep", "eval/fd", "eval/fd_data_floor"))
    assert run.data.tags["modality"] == "video" and run.data.tags["dataset"] == "moving_digits"
    assert "DualTimestepScheduler.mask_ratio = 0.1" in (result.run_dir / "operative_config.gin").read_text()

    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin

    config.parse(["video/selfflow.gin"], [])
    experiment = build_from_gin()
    assert experiment.tokenizer.token_shape == (4 * 4, 8 * 4 * 4)  # (16/4)(16/4) tubes of 8x4x4 values
    from selfflow.components.backbones.embeddings import sincos_position_embedding

    positions = experiment.model.position_embedding.reshape(16, -1)
    assert torch.equal(positions, sincos_position_embedding((1, 4, 4), experiment.model.hidden_dim))  # 3-D grid

    # Samples: 10 classes x 2 per class, each an 8-frame strip (16 px frames, 1 px gaps, upscaled 2x).
    grid = sorted((result.run_dir / "samples").glob("step-*.png"))[-1]
    with Image.open(grid) as image:
        strip_width, strip_height = 2 * (8 * 17 - 1), 2 * 16
        assert image.width == 2 * strip_width + 3 * 2  # 2 strips a row, torchvision's 2-px padding
        assert image.height == 10 * strip_height + 11 * 2
