"""`selfflow compare`: grouping, mean ± 95% t-interval over seeds, plots, MLflow logging."""
from __future__ import annotations

import math

import pytest

from selfflow.platform.errors import UserError
from selfflow.platform.tracking.compare import compare_runs, format_cell, mean_interval

# group -> seed -> final loss/flow; histories are made from these below.
FINAL = {"include=digits/fm": [0.50, 0.54, 0.52], "include=digits/selfflow": [0.40, 0.41, 0.45]}


@pytest.fixture(scope="module")
def sweep_runs(tmp_path_factory):
    """A parent run and 6 children (2 groups x 3 seeds) in a fresh SQLite store."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    tmp_path = tmp_path_factory.mktemp("store")  # one store for the module: creating one costs seconds
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("cmp", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment_id, run_name="sweep", tags={"sweep.role": "parent"}).info.run_id
    objectives = {"include=digits/fm": "FlowMatchingObjective", "include=digits/selfflow": "SelfFlowObjective"}
    for group, finals in FINAL.items():
        for seed, final in enumerate(finals):
            run = client.create_run(experiment_id, tags={
                "mlflow.parentRunId": parent, "sweep.group": group, "seed": str(seed), "objective": objectives[group]})
            metrics = [Metric("loss/flow", final + 1.0 / step, 0, step) for step in (1, 2, 4)]
            metrics.append(Metric("loss/flow", final, 0, 10))
            metrics.append(Metric("eval/fd", 10 * final, 0, 10))
            client.log_batch(run.info.run_id, metrics=metrics)
            client.set_terminated(run.info.run_id)
    # A run of another experiment-wide kind that must not join the sweep's comparison.
    client.create_run(experiment_id, tags={"objective": "REPAObjective"})
    return uri, client, parent


def test_mean_interval_is_students_t():
    from scipy import stats

    values = [0.40, 0.41, 0.45]
    mean, half = mean_interval(values)
    sd = math.sqrt(sum((v - sum(values) / 3) ** 2 for v in values) / 2)
    assert mean == pytest.approx(sum(values) / 3)
    assert half == pytest.approx(stats.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert math.isnan(mean_interval([1.0])[1]) and format_cell(1.0, math.nan, 1) == "1 (n=1)"


def test_compare_by_parent_groups_seeds_and_logs(sweep_runs, tmp_path, capsys):
    uri, client, parent = sweep_runs
    comparison = compare_runs(tracking_uri=uri, parent_run_id=parent, metrics=["loss/flow", "eval/fd"],
                              out_dir=tmp_path / "out", log_to_run=parent)
    printed = capsys.readouterr().out
    assert [g.group for g in comparison.groups] == sorted(FINAL)
    for group in comparison.groups:
        assert len(group.run_ids) == 3 and sorted(group.seeds) == ["0", "1", "2"]
        mean, half, n = group.mean_and_halfwidth("loss/flow")
        expected_mean, expected_half = mean_interval(FINAL[group.group])
        assert (mean, n) == (pytest.approx(expected_mean), 3) and half == pytest.approx(expected_half)
        assert f"{expected_mean:.4g} ± {expected_half:.2g}" in printed
    assert "REPAObjective" not in printed  # not a child of this parent
    plots = {p.name for p in comparison.files if p.suffix == ".png"}
    assert plots == {"loss_flow.png", "eval_fd.png"}
    logged = {a.path for a in client.list_artifacts(parent, "compare")}
    assert {"compare/comparison.txt", "compare/comparison.csv", "compare/plots"} <= logged
    assert {a.path for a in client.list_artifacts(parent, "compare/plots")} == {
        "compare/plots/loss_flow.png", "compare/plots/eval_fd.png"}
    # The same table as an MLflow table (the UI's table view): one row per group.
    import json

    raw = json.loads(open(client.download_artifacts(parent, "compare/comparison.json", str(tmp_path / "t"))).read())
    rows = {row[0]: dict(zip(raw["columns"], row)) for row in raw["data"]}
    assert set(rows) == set(FINAL)
    for group, finals in FINAL.items():
        mean, half = mean_interval(finals)
        assert rows[group]["loss/flow mean"] == pytest.approx(mean) and rows[group]["loss/flow ci95"] == pytest.approx(half)
        assert rows[group]["runs"] == 3 and rows[group]["loss/flow n"] == 3
    tags = client.get_run(parent).data.tags
    assert {"path": "compare/comparison.json", "type": "table"} in json.loads(tags["mlflow.loggedArtifacts"])


def test_compare_by_filter_and_experiment(sweep_runs, tmp_path):
    uri, client, _ = sweep_runs
    only_selfflow = compare_runs(tracking_uri=uri, experiment="cmp", filter_string="tags.objective = 'SelfFlowObjective'",
                                 out_dir=tmp_path / "f", show=False)
    assert [g.group for g in only_selfflow.groups] == ["include=digits/selfflow"]
    everything = compare_runs(tracking_uri=uri, experiment="cmp", out_dir=tmp_path / "e", show=False,
                              log_new_run=True)
    assert len(everything.groups) == 3  # the two sweep groups and the lone REPA run (no metrics)
    compare_run = [r for r in client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
                   if r.data.tags.get("sweep.role") == "compare"]
    assert len(compare_run) == 1 and compare_run[0].info.status == "FINISHED"
    with pytest.raises(UserError, match="no runs match"):
        compare_runs(tracking_uri=uri, experiment="cmp", filter_string="tags.objective = 'nothing'",
                     out_dir=tmp_path / "n", show=False)
    with pytest.raises(UserError, match="no MLflow experiment"):
        compare_runs(tracking_uri=uri, experiment="missing", out_dir=tmp_path / "m", show=False)


def test_unfinished_runs_are_never_averaged_with_finished_ones(tmp_path):
    """The issue's case: a killed run is still marked RUNNING (its process died before saying so);
    it forms a group of its own instead of joining its seeds' mean."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("killed", artifact_location=(tmp_path / "artifacts").as_uri())
    for seed, (value, status) in enumerate([(0.5, "FINISHED"), (0.7, "FINISHED"), (9.0, None)]):
        run = client.create_run(experiment_id, tags={"sweep.group": "include=digits/fm", "seed": str(seed)})
        client.log_batch(run.info.run_id, metrics=[Metric("loss/flow", value, 0, 10)])
        if status:
            client.set_terminated(run.info.run_id, status)
    comparison = compare_runs(tracking_uri=uri, experiment="killed", metrics=["loss/flow"], out_dir=tmp_path / "o",
                              show=False)
    stats = {g.group: g.mean_and_halfwidth("loss/flow") for g in comparison.groups}
    assert stats["include=digits/fm"][0] == pytest.approx(0.6) and stats["include=digits/fm"][2] == 2
    assert stats["include=digits/fm [RUNNING]"][0] == pytest.approx(9.0)


def test_unknown_metric_and_bad_filter_are_one_line_errors(sweep_runs, tmp_path):
    uri, _, parent = sweep_runs
    with pytest.raises(UserError, match=r"--metric 'nope': none of the 6 compared runs logged it \(logged: eval/fd, "
                                        r"loss/flow\)"):
        compare_runs(tracking_uri=uri, parent_run_id=parent, metrics=["loss/flow", "nope"], out_dir=tmp_path,
                     show=False)
    with pytest.raises(UserError, match=r"--filter 'tags\.objective = ' is not a valid MLflow filter"):
        compare_runs(tracking_uri=uri, experiment="cmp", filter_string="tags.objective = ", out_dir=tmp_path,
                     show=False)
