"""The evaluation suite end to end: a short digits run evaluates into its MLflow run during
training, and `selfflow eval` adds to the same run at the checkpoint's step."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from selfflow.platform.cli import main as cli_main
from selfflow.platform.train.driver import train

STEPS = 40
SMALL = [
    f"TrainConfig.steps = {STEPS}",
    "TrainConfig.batch_size = 32",
    "TrainConfig.log_every = 10",
    "TrainConfig.eval_every = 0",
    "TrainConfig.checkpoint_every = 0",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
    "EvalSuite.min_steps = 0",
    "EvalSuite.every = 20",
    "EvalSuite.num_samples = 40",
    "EvalSuite.sample_batch = 40",
    "EvalSuite.probe_levels = (0.0, 0.5)",
    "EvalSuite.probe_train_samples = 200",
    "EvalSuite.probe_test_samples = 100",
    "EvalSuite.loss_samples = 100",
    "EvalSuite.knn_k = 5",
    "ClassifierEvaluator.steps = 30",
]
DEPTH = 6  # backbones/dit_tiny.gin
LEVELS = ("t0", "t0.5")
# EvalSuite.loss_buckets = 10 equal intervals of [0, 1], named by their ends.
BUCKETS = [f"loss_by_t/t{i / 10:.2f}-{(i + 1) / 10:.2f}" for i in range(10)]


def expected_metric_names() -> set[str]:
    names = {"eval/fd", "eval/fd_data_floor", "eval/fd_tokenizer_floor", "eval/sample_class_acc", "eval/precision", "eval/recall",
             "eval/evaluator_test_acc", "timing/eval/seconds", "timing/eval/cpu_seconds",
             "timing/eval/generation_seconds", "timing/eval/probes_seconds", "timing/eval/loss_by_t_seconds",
             "timing/eval/generated_samples", "probe/linear/best", "probe/knn/best", "probe/linear/best_block",
             "loss_by_t/overall"}
    names |= set(BUCKETS)
    names |= {f"probe_grid/{kind}/{level}_block{block}" for kind in ("linear", "knn")
              for block in range(1, DEPTH + 1) for level in LEVELS}
    return names


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root):
    """One short run shared by the tests of this file (training costs the most)."""
    import os

    folder = tmp_path_factory.mktemp("evalrun")
    runs = folder / "runs"
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        result = train(["digits/fm.gin"], SMALL + [f"ShardData.root = '{digits_root}'"],
                       run_dir=runs / "fm", runs_dir=runs, progress=False)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    from mlflow.tracking import MlflowClient

    return result, MlflowClient(tracking_uri=result.tracking_uri)


def history_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_training_logs_every_metric_at_each_evaluation_step(trained):
    result, client = trained
    run = client.get_run(result.mlflow_run_id)
    missing = expected_metric_names() - set(run.data.metrics)
    assert not missing, f"metrics not logged: {sorted(missing)}"
    assert BUCKETS[0] == "loss_by_t/t0.00-0.10" and BUCKETS[9] == "loss_by_t/t0.90-1.00"
    for key in ("eval/fd", "probe_grid/linear/t0.5_block3", BUCKETS[9]):
        assert history_steps(client, result.mlflow_run_id, key) == [20, STEPS]
    metrics = run.data.metrics
    assert all(math.isfinite(metrics[key]) for key in expected_metric_names())
    # A few dozen steps are far from real data: the floor (real images) must score better.
    assert 0.0 <= metrics["eval/fd_data_floor"] < metrics["eval/fd"]
    # Pixels survive the tokenizer exactly: its floor is the data floor.
    assert metrics["eval/fd_tokenizer_floor"] == pytest.approx(metrics["eval/fd_data_floor"], rel=1e-4, abs=1e-6)
    for kind in ("linear", "knn"):  # "best" is the best cell of the block x level table
        cells = [value for key, value in metrics.items() if key.startswith(f"probe_grid/{kind}/")]
        assert metrics[f"probe/{kind}/best"] == max(cells)
    # Ten equally filled buckets: their plain mean is the overall held-out loss.
    buckets = [metrics[name] for name in BUCKETS]
    assert sum(buckets) / 10 == pytest.approx(metrics["loss_by_t/overall"], rel=1e-6)
    # The evaluator was trained once (first evaluation) and then reused.
    assert history_steps(client, result.mlflow_run_id, "timing/eval/evaluator_fit_seconds") == [20]
    assert len(list((result.run_dir.parent / ".cache" / "evaluators").glob("*.pt"))) == 1


def test_training_writes_and_logs_the_artifacts(trained):
    result, client = trained
    logged = {entry.path for entry in client.list_artifacts(result.mlflow_run_id, "eval")}
    for step in (20, STEPS):
        for name in (f"probes-step{step:08d}.png", f"loss_by_t-step{step:08d}.png", f"metrics-step{step:08d}.json"):
            assert f"eval/{name}" in logged
            assert (result.run_dir / "eval" / name).is_file()
        with Image.open(result.run_dir / "eval" / f"probes-step{step:08d}.png") as image:
            assert image.width > 200 and image.height > 100
    saved = json.loads((result.run_dir / "eval" / f"metrics-step{STEPS:08d}.json").read_text())
    assert saved["step"] == STEPS and set(saved["metrics"]) >= expected_metric_names()
    assert not list((result.run_dir / "eval").glob(".*"))  # no temp files left behind
    # The heatmap, the loss-by-t chart and the sample grid are also step images (the UI's image view).
    from selfflow.platform.tracking.records import image_steps

    steps = image_steps(client, result.mlflow_run_id)
    for key in ("eval/probe_heatmap", "eval/loss_by_t"):
        assert {(key, 20), (key, STEPS)} <= steps, key
    assert ("samples/grid", STEPS) in steps  # sample grids follow TrainConfig.eval_every (0 here: the end only)


def test_selfflow_eval_by_run_id_logs_into_the_same_run(trained, capsys):
    result, client = trained
    code = cli_main(["eval", "--run-id", result.mlflow_run_id, "--tracking-uri", result.tracking_uri])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eval/fd" in printed and "probe/linear/best" in printed
    assert history_steps(client, result.mlflow_run_id, "eval/fd") == [20, STEPS, STEPS]
    assert history_steps(client, result.mlflow_run_id, "timing/eval/evaluator_fit_seconds") == [20]  # cache hit
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_selfflow_eval_by_run_dir_without_tracking_is_reproducible(trained, capsys):
    result, client = trained
    before = len(client.get_metric_history(result.mlflow_run_id, "eval/fd"))
    assert cli_main(["eval", "--run-dir", str(result.run_dir), "--no-tracking"]) == 0
    assert len(client.get_metric_history(result.mlflow_run_id, "eval/fd")) == before
    # Fixed seeds: evaluating the same checkpoint again gives the same numbers.
    saved = json.loads((result.run_dir / "eval" / f"metrics-step{STEPS:08d}.json").read_text())["metrics"]
    final = client.get_run(result.mlflow_run_id).data.metrics
    for key in ("eval/fd", "eval/sample_class_acc", "probe_grid/linear/t0_block2", BUCKETS[0]):
        assert saved[key] == pytest.approx(final[key], rel=1e-4, abs=1e-6)


def test_selfflow_eval_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["eval", "--run-dir", str(tmp_path / "nothing"), "--no-tracking"]) == 2
    assert "not a run folder" in capsys.readouterr().err


@pytest.mark.slow
def test_inception_evaluator_loads_torchvision_weights_from_a_local_file(tmp_path):
    """The ImageNet-scale path on a weights file written here (random weights: the loading code is real)."""
    import torch
    from torchvision.models.inception import Inception3

    from selfflow.components.metrics.inception import InceptionFeatures

    torch.manual_seed(0)
    torch.save(Inception3(aux_logits=True, init_weights=False).state_dict(), tmp_path / "inception.pth")
    network = InceptionFeatures(tmp_path / "inception.pth", "torchvision", data_range=(-1.0, 1.0))
    with torch.no_grad():
        features = network.features(torch.rand(2, 3, 16, 16) * 2 - 1)
        grey = network.features(torch.zeros(2, 1, 16, 16))
    assert features.shape == (2, 2048) and grey.shape == (2, 2048)
    assert network.head(features).shape == (2, 1000)
    assert torch.isfinite(features).all()
