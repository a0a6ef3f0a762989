"""Audio with the same code as images and video: a short spoken-digits Self-Flow run trains on a 1-D
token grid (spectrogram frames), evaluates with the spectrogram evaluator into MLflow, and writes its samples as a
spectrogram grid and a wav."""
from __future__ import annotations

import math
import wave

import torch

from selfflow.platform.train.driver import train

SMALL = [
    "TrainConfig.steps = 12",
    "TrainConfig.batch_size = 16",
    "TrainConfig.log_every = 4",
    "TrainConfig.checkpoint_every = 0",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 2",
    "EvalSuite.min_steps = 0",
    "EvalSuite.every = 0",
    "EvalSuite.num_samples = 20",
    "EvalSuite.sample_batch = 20",
    "EvalSuite.probe_levels = (0.0,)",
    "EvalSuite.probe_train_samples = 60",
    "EvalSuite.probe_test_samples = 30",
    "EvalSuite.loss_samples = 30",
    "EvalSuite.knn_k = 5",
    "ClassifierEvaluator.steps = 20",
]


def test_spoken_digits_selfflow_trains_evaluates_and_writes_audio(in_tmp, spoken_digits_root):
    (in_tmp / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    result = train(["audio/selfflow.gin"], SMALL, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs", progress=False)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    metrics = run.data.metrics
    assert {"loss/flow", "loss/rep", "eval/fd", "eval/sample_class_acc", "probe/linear/best"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("loss/flow", "loss/rep", "eval/fd", "eval/fd_data_floor"))
    assert run.data.tags["modality"] == "audio" and run.data.tags["dataset"] == "spoken_digits"
    assert "DualTimestepScheduler.mask_ratio = 0.5" in (result.run_dir / "operative_config.gin").read_text()
    logged = {item.path for item in client.list_artifacts(result.mlflow_run_id, "samples")}
    assert {"samples/step-00000012.png", "samples/step-00000012.wav"} <= logged

    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin

    config.parse(["audio/selfflow.gin"], [])
    experiment = build_from_gin()
    assert experiment.tokenizer.token_shape == (40, 128)  # 40 spectrogram frames of 128 bins
    from selfflow.components.backbones.embeddings import sincos_position_embedding

    positions = experiment.model.position_embedding.reshape(40, -1)
    assert torch.equal(positions, sincos_position_embedding((40,), experiment.model.hidden_dim))  # 1-D grid

    # The wav holds the grid's 10 classes x 2 samples, 0.64 s each with 0.25 s of silence after.
    with wave.open(str(result.run_dir / "samples" / "step-00000012.wav")) as handle:
        assert handle.getframerate() == 8000
        assert handle.getnframes() == 20 * (5120 + 2000)
