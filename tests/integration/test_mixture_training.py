"""Modality mixtures end to end: one model trains on digits images and spoken digits, logs each
modality's loss terms and evaluation into one MLflow run, writes each modality's samples, and
resumes onto exactly the curve an uninterrupted run follows."""
from __future__ import annotations

import math

import torch

from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.driver import train

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

    from selfflow.platform.train.saved import evaluate_run

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


def test_a_joint_step_trains_on_the_weighted_sum_of_every_modalitys_loss(in_tmp, spoken_digits_root):
    """MixtureData.per_step = 'all': the step's loss is w_audio L_audio + w_image L_image, each computed
    as the objective computes it alone, in name order from the one generator; its gradient is that
    sum's (re-derived here on a copy of the model), and each modality logs its own terms."""
    import copy

    from torch import nn

    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train.trainer import Trainer

    (in_tmp / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    config.parse(["mixtures/digits_speech/selfflow.gin"],
                 ["build_experiment.evaluation = None", "TrainConfig.batch_size = 8", "TrainConfig.warmup_steps = 0",
                  "MixtureData.per_step = 'all'", "MixtureData.weights = {'image': 3.0, 'audio': 1.0}"])
    experiment = build_from_gin()
    loader = experiment.data.loader(batch_size=8, seed=0)
    trainer = Trainer(experiment, loader, in_tmp / "run", progress=False)
    raw = next(loader)
    assert [part["modality"] for part in raw["parts"]] == ["audio", "image"] and raw["weights"] == [0.25, 0.75]

    reference = copy.deepcopy(trainer.module)
    teacher = copy.deepcopy(trainer.ema.model)
    generator = torch.Generator()
    generator.set_state(trainer.generator.get_state())
    outs = [reference(trainer.make_batch(part), teacher, generator) for part in raw["parts"]]
    expected = 0.25 * outs[0].total() + 0.75 * outs[1].total()
    expected.backward()
    trainable = [p for p in reference.parameters() if p.requires_grad]
    nn.utils.clip_grad_norm_(trainable, experiment.train.grad_clip)

    logs = trainer.train_step(raw)
    assert math.isclose(logs["loss/total"], float(expected.detach()), rel_tol=1e-6)
    for name in ("flow", "rep"):
        by_modality = [float(out.terms[name].detach()) for out in outs]
        assert math.isclose(logs[f"loss/audio/{name}"], by_modality[0], rel_tol=1e-6)
        assert math.isclose(logs[f"loss/image/{name}"], by_modality[1], rel_tol=1e-6)
        assert math.isclose(logs[f"loss/{name}"], 0.25 * by_modality[0] + 0.75 * by_modality[1], rel_tol=1e-6)
    assert abs(logs["diag/audio/masked_fraction"] - 0.5) < 0.1 and abs(logs["diag/image/masked_fraction"] - 0.25) < 0.1
    for (name, mine), theirs in zip(trainer.module.named_parameters(), reference.parameters()):
        if theirs.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Both modalities' token layers trained in this one step.
    for layer in ("input_projections", "final_layers"):
        for modality in ("audio", "image"):
            grads = [p.grad for n, p in trainer.module.model.named_parameters() if n.startswith(f"{layer}.{modality}")]
            assert grads and all(g is not None for g in grads), (layer, modality)
            assert any(g.abs().sum() > 0 for g in grads), (layer, modality)  # adaLN-Zero leaves some at 0
