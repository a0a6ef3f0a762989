"""Modality mixtures end to end: one model trains on digits images and spoken digits, logs each
modality's loss terms and evaluation into one MLflow run, writes each modality's samples, and
resumes onto exactly the curve an uninterrupted run follows."""
from __future__ import annotations

import math

import torch

from selfflow.platform import checkpoint as ckpt
from selfflow.platform.run import train

SMALL = [
    "TrainConfig.steps = 10",
    "TrainConfig.batch_size = 16",
    "TrainConfig.log_every = 5",
    "TrainConfig.checkpoint_every = 0",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
    "EvalSuite.min_steps = 0",
    "EvalSuite.every = 0",
    "EvalSuite.num_samples = 20",
    "EvalSuite.sample_batch = 20",
    "EvalSuite.probe_levels = (0.0,)",
    "EvalSuite.probe_train_samples = 40",
    "EvalSuite.probe_test_samples = 20",
    "EvalSuite.loss_samples = 20",
    "EvalSuite.knn_k = 3",
    "ClassifierEvaluator.steps = 10",
]


def test_digits_and_speech_train_in_one_model_and_evaluate_per_modality(in_tmp, spoken_digits_root):
    (in_tmp / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    result = train(["mixtures/digits_speech/selfflow.gin"], SMALL, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs",
                   progress=False)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    metrics = run.data.metrics
    for modality in ("image", "audio"):
        wanted = {f"loss/{modality}/flow", f"loss/{modality}/rep", f"diag/{modality}/masked_fraction",
                  f"eval/{modality}/fd", f"eval/{modality}/sample_class_acc", f"probe/{modality}/linear/best"}
        assert wanted <= set(metrics), wanted - set(metrics)
        assert math.isfinite(metrics[f"eval/{modality}/fd"])
    assert {"loss/flow", "loss/rep"} <= set(metrics)
    assert run.data.tags["modality"] == "mixture(audio+image)"
    assert run.data.tags["dataset"] == "spoken_digits+digits"
    assert run.data.tags["backbone"] == "MultiModalDiT"
    samples = {item.path for item in client.list_artifacts(result.mlflow_run_id, "samples")}
    assert {"samples/step-00000010-image.png", "samples/step-00000010-audio.png",
            "samples/step-00000010-audio.wav"} <= samples
    evaluated = {item.path for item in client.list_artifacts(result.mlflow_run_id, "eval")}
    assert {"eval/image", "eval/audio"} <= evaluated
    assert (result.run_dir / "eval" / "audio" / "metrics-step00000010.json").exists()
    # Each modality trains with its own mask ratio (R_M 0.25 images, 0.5 audio): over 16 x 64 audio
    # tokens the masked share sits near 0.5, over 16 x 16 image tokens near 0.25.
    assert abs(metrics["diag/audio/masked_fraction"] - 0.5) < 0.1
    assert abs(metrics["diag/image/masked_fraction"] - 0.25) < 0.1

    from selfflow.platform.evaluation import evaluate_run

    again = evaluate_run(run_dir=result.run_dir, tracking=False)  # `selfflow eval` on a mixture
    assert {"eval/image/fd", "eval/audio/fd"} <= set(again.metrics)
    assert math.isclose(again.metrics["eval/audio/fd"], metrics["eval/audio/fd"], rel_tol=1e-4)


def test_a_resumed_mixture_run_continues_the_same_curve(in_tmp, spoken_digits_root):
    import shutil

    (in_tmp / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    # One log, at step 8, averaging steps 1-8; a checkpoint at step 4 holds the running sums (and their
    # per-key counts: audio and image terms appear on different steps) and the modality draw state.
    quick = ["TrainConfig.batch_size = 8", "TrainConfig.log_every = 10", "TrainConfig.steps = 8",
             "TrainConfig.checkpoint_every = 4", "TrainConfig.keep_checkpoints = 3",
             "build_experiment.evaluation = None", "SamplingConfig.steps = 1", "SamplingConfig.per_class = 1"]
    straight = train(["mixtures/digits_speech/selfflow.gin"], quick, run_dir=in_tmp / "straight", tracking=False,
                     progress=False)
    shutil.copytree(in_tmp / "straight", in_tmp / "resumed")
    (in_tmp / "resumed" / "checkpoints" / "step-00000008.pt").unlink()  # as if killed after step 4
    resumed = train(["mixtures/digits_speech/selfflow.gin"], quick, run_dir=in_tmp / "resumed", resume=True,
                    tracking=False, progress=False)
    a, b = ckpt.load(straight.checkpoint), ckpt.load(resumed.checkpoint)
    for key, value in a["ema"]["model"].items():
        torch.testing.assert_close(b["ema"]["model"][key], value, rtol=0, atol=0, msg=key)
    assert a["data"]["draws"].equal(b["data"]["draws"])
    timing = {"train/samples_per_s"}  # wall-clock: differs; every other logged mean must not
    assert {k: v for k, v in straight.final_metrics.items() if k not in timing} == \
        {k: v for k, v in resumed.final_metrics.items() if k not in timing}
    assert {"loss/audio/flow", "loss/image/flow"} <= set(straight.final_metrics)
