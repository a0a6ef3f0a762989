"""The tracker's richer records (params, text, step images, tables, dataset inputs) go through the
journal like metrics: they survive an outage, and a replay after a lost watermark stores nothing twice."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from selfflow.platform.tracking import mlflow_tracker as tracking
from selfflow.platform.tracking import records
from selfflow.platform.tracking.journal import journal_path
from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, sync_run_dir


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the file: creating an MLflow SQLite database costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def _png(path, value: int):
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _table(client, run_id: str, artifact_file: str, folder) -> dict:
    """A table artifact's columns (MLflow's load_table searches runs through the global tracking URI)."""
    raw = json.loads(open(client.download_artifacts(run_id, artifact_file, str(folder))).read())
    return {column: [row[i] for row in raw["data"]] for i, column in enumerate(raw["columns"])}


def _drop_watermarks(run_dir) -> None:
    """What a kill between a delivery and its watermark leaves: every record looks undelivered."""
    path = journal_path(run_dir)
    path.write_text("\n".join(line for line in path.read_text().splitlines() if '"delivered"' not in line) + "\n")


def test_param_limits_are_mlflows():
    long_key = "scope/" + "Configurable" * 30 + ".value"
    other = "scope/" + "Configurable" * 30 + ".other"
    items = records.param_items({long_key: 1, other: 2, "a.b": "x" * 7000, "odd<key>": 3}, "config/op.txt")
    assert all(len(key) <= records.MAX_PARAM_KEY for key in items) and len(items) == 4  # long keys stay distinct
    cut = items["a.b"]
    assert len(cut) == records.MAX_PARAM_VALUE and cut.endswith("[7000 chars; cut, full text in config/op.txt]")
    assert items["odd_key_"] == "3"
    assert records.shorten("short", 10) == "short"


def test_params_text_table_dataset_and_images_reach_the_run(tmp_path, uri):
    tracker = MLflowTracker(tracking_uri=uri, run_name="records", journal_dir=tmp_path / "run")
    tracker.log_params({"TrainConfig.lr": "0.001"})
    tracker.log_params({"TrainConfig.lr": "1e-3", "TrainConfig.bf16": "False"})  # a later, fuller config
    tracker.log_text("TrainConfig.lr = 0.001\n", "config/operative_config.gin.txt")
    tracker.log_table({"group": ["fm", "selfflow"], "eval/fd": [7.0, 5.5]}, "sweep/comparison.json")
    tracker.log_dataset({"name": "digits/train", "digest": "0123456789abcdef", "source_type": "local",
                         "source": json.dumps({"uri": "data/digits/train.index.json"}), "context": "train"})
    for step, value in ((10, 0), (20, 255)):
        tracker.log_image(_png(tmp_path / f"grid{step}.png", value), "samples/grid", step)
    tracker.finish()
    client = tracker.client
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"TrainConfig.lr": "0.001", "TrainConfig.bf16": "False"}  # the first value stays
    text = client.download_artifacts(tracker.run_id, "config/operative_config.gin.txt", str(tmp_path / "dl"))
    assert open(text).read() == "TrainConfig.lr = 0.001\n"
    table = _table(client, tracker.run_id, "sweep/comparison.json", tmp_path / "t")
    assert table == {"group": ["fm", "selfflow"], "eval/fd": [7.0, 5.5]}
    assert {"path": "sweep/comparison.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    (dataset_input,) = run.inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("digits/train", "0123456789abcdef")
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "train")]
    assert records.image_steps(client, tracker.run_id) == {("samples/grid", 10), ("samples/grid", 20)}
    assert run.data.tags.get("mlflow.loggedImages") == "True"


def test_a_replay_stores_no_image_or_table_twice(tmp_path, uri):
    tracker = MLflowTracker(tracking_uri=uri, run_name="replay", journal_dir=tmp_path / "run")
    tracker.log_image(_png(tmp_path / "a.png", 10), "eval/probes", 5)
    tracker.log_table({"x": [1, 2]}, "t/table.json")
    tracker.log_text("v1", "notes.txt")
    tracker.journal.close()  # killed
    _drop_watermarks(tmp_path / "run")
    result = sync_run_dir(tmp_path / "run", tracking_uri=uri)
    assert (result.pending_before, result.pending_after) == (3, 0)
    client = tracker.client
    images = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    assert len(images) == 2  # one full-size png and its compressed webp, not two pairs
    assert _table(client, tracker.run_id, "t/table.json", tmp_path / "t") == {"x": [1, 2]}  # not appended again
    records.send_table(client, tracker.run_id, {"x": [3]}, "t/table.json")  # a newer table replaces it
    assert _table(client, tracker.run_id, "t/table.json", tmp_path / "t2") == {"x": [3]}


def test_an_outage_queues_images_and_params_until_the_store_is_back(tmp_path, uri, monkeypatch):
    monkeypatch.setenv(tracking.DRAIN_ENV, "0")
    tracker = MLflowTracker(tracking_uri=uri, run_name="outage", journal_dir=tmp_path / "run")
    real_log_image, real_log_batch = tracker.client.log_image, tracker.client.log_batch

    def down(*args, **kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(tracker.client, "log_image", down)
    monkeypatch.setattr(tracker.client, "log_batch", down)
    tracker.log_image(_png(tmp_path / "s.png", 99), "samples/grid", 3)
    tracker.log_params({"DiT.depth": 6})
    assert tracker.pending == 2
    tracker.finish()  # still down: both stay in the journal
    monkeypatch.setattr(tracker.client, "log_image", real_log_image)
    monkeypatch.setattr(tracker.client, "log_batch", real_log_batch)
    result = sync_run_dir(tmp_path / "run", tracking_uri=uri)
    assert result.pending_after == 0
    assert records.image_steps(tracker.client, tracker.run_id) == {("samples/grid", 3)}
    assert tracker.client.get_run(tracker.run_id).data.params == {"DiT.depth": "6"}
