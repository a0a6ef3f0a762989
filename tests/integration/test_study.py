"""`selfflow study`: planning, a quick tiny study end to end on Ray Tune + MLflow, the report rewritten
byte for byte from the store, and a study killed mid-way (SIGKILL of its process group) that resumes
without rerunning a finished trial."""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfflow.platform.config.bootstrap import EXPERIMENTS_DIR
from selfflow.platform.errors import ConfigError
from selfflow.platform.scale.study import expand_presets, plan_study, redirect_bindings, run_study, short_values

QUICK = """[
    'TrainConfig.steps = 4', 'TrainConfig.batch_size = 8', 'TrainConfig.log_every = 1',
    'TrainConfig.warmup_steps = 1', 'TrainConfig.checkpoint_every = 2', 'TrainConfig.eval_every = 0',
    'EvalSuite.every = 2', 'EvalSuite.min_steps = 0', 'EvalSuite.num_samples = 20',
    'EvalSuite.probe_levels = (0.5,)', 'EvalSuite.loss_buckets = 2', 'ClassifierEvaluator.steps = 10',
    'SamplingConfig.steps = 2',
]"""

TINY_STUDY = f"""
Study.name = 'tiny'
Study.title = 'A tiny study'
Study.seeds = [0, 1]
Study.max_concurrent = 2
Study.sections = {{'main': ['objectives'], 'later': ['widths']}}
Study.sweeps = {{
    'objectives': {{'space': {{'include': ('presets', ['digits/fm.gin', 'digits/selfflow.gin', 'digits/none*.gin'])}}}},
    'widths': {{'base_files': ['digits/fm.gin'], 'space': {{'DiT.hidden_dim': ('grid', [32, 64])}}, 'seeds': [0, 1]}},
}}
Study.quick_bindings = {QUICK}
Study.tables = [{{'title': 'Objectives', 'sweep': 'objectives', 'metrics': ['eval/fd', 'probe/linear/best']}},
                {{'title': 'Probes', 'sweep': 'objectives', 'probes': 'linear'}}]
Study.plots = [{{'sweep': 'objectives', 'metrics': ['eval/fd', 'loss/flow']}}]
Study.claims = [
    {{'id': '1', 'statement': 'Self-Flow beats FM', 'kind': 'better', 'metric': 'eval/fd',
      'a': 'objectives:selfflow', 'b': 'objectives:fm'}},
    {{'id': '1w', 'statement': 'at equal wall time', 'kind': 'better', 'metric': 'eval/fd', 'at': 'wall',
      'a': 'objectives:selfflow', 'b': ['objectives:fm']}},
    {{'id': '2', 'statement': 'no better probe', 'kind': 'no_better', 'metric': 'probe/linear/best',
      'a': 'objectives:selfflow', 'b': 'objectives:fm'}},
    {{'id': '6', 'statement': 'faster', 'kind': 'faster', 'metric': 'eval/fd', 'threshold': 1e6,
      'a': 'objectives:selfflow', 'b': 'objectives:fm'}},
    {{'id': '5', 'statement': 'scales', 'kind': 'scaling', 'metric': 'eval/fd', 'sweep': 'widths',
      'size': 'DiT.hidden_dim', 'a': 'all', 'b': 'all'}},
]
"""

# Four trials, one at a time, each slow enough to be killed mid-way.
KILL_STUDY = f"""
Study.name = 'killed'
Study.seeds = [0, 1]
Study.max_concurrent = 1
Study.sweeps = {{'fm': {{'base_files': ['digits/fm.gin'], 'space': {{'DiT.hidden_dim': ('grid', [32, 48])}}}}}}
Study.quick_bindings = {QUICK.replace("'TrainConfig.steps = 4'", "'TrainConfig.steps = 12'")}
Study.claims = [{{'id': '1', 'statement': 'wider is better', 'kind': 'better', 'metric': 'loss/flow',
                  'a': 'fm:hidden_dim=48', 'b': 'fm:hidden_dim=32'}}]
"""

# Two sweeps of two trials each: a SIGINT during the first must end the sitting there.
INTERRUPT_STUDY = KILL_STUDY.replace("Study.name = 'killed'", "Study.name = 'interrupted'").replace(
    "Study.sweeps = {'fm': {'base_files': ['digits/fm.gin'], 'space': {'DiT.hidden_dim': ('grid', [32, 48])}}}",
    "Study.sweeps = {'fm': {'base_files': ['digits/fm.gin'], 'space': {'DiT.hidden_dim': ('grid', [32])}}, "
    "'later': {'base_files': ['digits/fm.gin'], 'space': {'DiT.hidden_dim': ('grid', [48])}}}")


# ---- planning (no training) ------------------------------------------------------------------------


def test_presets_and_cell_labels():
    found, missing = expand_presets(["digits/ablations/gamma*.gin", "digits/fm.gin", "audio/no_such*.gin"])
    assert found == ["digits/ablations/gamma0.gin", "digits/fm.gin"] and missing == ["audio/no_such*.gin"]
    assert short_values("include", ["digits/fm.gin", "audio/fm.gin", "digits/sra.gin"]) == \
        ["digits/fm", "audio/fm", "digits/sra"]
    assert short_values("include", ["digits/fm.gin", "digits/ablations/l1.gin"]) == ["fm", "l1"]
    assert short_values("DiT.hidden_dim", [48, 96]) == ["hidden_dim=48", "hidden_dim=96"]


def test_quick_redirects_point_every_binding_that_names_a_prerequisite():
    config = ("digit_encoder_from.path = 'runs/encoders/e.pt'\nimage/Thing.path = \"runs/encoders/e.pt\"\n"
              "Other.path = 'runs/encoders/other.pt'\nTrainConfig.steps = 3\n")
    assert redirect_bindings(config, {"runs/encoders/e.pt": "/q/e.pt"}) == [
        "digit_encoder_from.path = '/q/e.pt'", "image/Thing.path = '/q/e.pt'"]
    assert redirect_bindings(config, {}) == []


def test_plan_keys_are_stable_and_follow_the_config(tmp_path):
    study_file = tmp_path / "tiny.gin"
    study_file.write_text(TINY_STUDY)
    first = plan_study(study_file, quick=True, runs_dir=tmp_path / "runs")
    again = plan_study(study_file, quick=True, runs_dir=tmp_path / "runs")
    keys = [t["key"] for s in first.sweeps for t in s.trials]
    assert keys == [t["key"] for s in again.sweeps for t in s.trials]
    assert len(keys) == len(set(keys)) == 2 * 2 + 2 * 2
    objectives = first.sweeps[0]
    assert [t["cell"] for t in objectives.trials] == ["fm"] * 2 + ["selfflow"] * 2
    assert objectives.note == "no preset matches digits/none*.gin"
    full = plan_study(study_file, quick=False, runs_dir=tmp_path / "runs")
    assert not set(keys) & {t["key"] for s in full.sweeps for t in s.trials}  # quick trials never count as full
    changed = plan_study(study_file, ["Study.quick_bindings = ['TrainConfig.steps = 5']"], quick=True,
                         runs_dir=tmp_path / "runs")
    assert not set(keys) & {t["key"] for s in changed.sweeps for t in s.trials}  # another config, another trial


@pytest.mark.parametrize("bad, message", [
    ("Study.sweeps = {'x': {'space': {'TrainConfig.lr': ('loguniform', 1e-4, 1e-3)}, 'base_files': ['digits/fm.gin']}}",
     "a study's axes are grids"),
    ("Study.sweeps = {'x': {'base_files': ['digits/fm.gin'], 'search': 'optuna'}}", "set by the study"),
    ("Study.sweeps = {'x': {'base_files': ['digits/fm.gin'], 'colour': 1}}", "unknown field"),
    ("Study.claims = [{'id': '1', 'statement': 's', 'kind': 'better', 'metric': 'eval/fd', 'a': 'nope:fm', "
     "'b': 'objectives:fm'}]", "sweep 'nope' is not in Study.sweeps"),
    ("Study.claims = [{'id': '1', 'statement': 's', 'kind': 'better', 'metric': 'weird', 'a': 'objectives:fm', "
     "'b': 'objectives:fm'}]", "mode must be 'min' or 'max'"),
    ("Study.claims = [{'id': '1', 'statement': 's', 'kind': 'faster', 'metric': 'eval/fd', 'a': 'objectives:fm', "
     "'b': 'objectives:fm'}]", "needs a 'threshold'"),
])
def test_bad_studies_raise_one_line(tmp_path, bad, message):
    study_file = tmp_path / "bad.gin"
    base = "Study.name = 'bad'\n" if bad.startswith("Study.sweeps") else TINY_STUDY
    study_file.write_text(base + "\n" + bad + "\n")
    with pytest.raises(ConfigError, match=message):
        plan_study(study_file, quick=True, runs_dir=tmp_path / "runs")


@pytest.mark.parametrize("quick", [False, True])
def test_shipped_studies_plan_every_trial(tmp_path, quick):
    for path in sorted((EXPERIMENTS_DIR / "studies").glob("*.gin")):
        study = plan_study(path, quick=quick, runs_dir=tmp_path / "runs")
        trials = [t for s in study.sweeps for t in s.trials]
        assert trials and all(len(s.spec.seeds) >= 3 for s in study.sweeps if s.spec)
        assert study.report_plan().claims
        repa = [t for s in study.sweeps for t in s.trials if "repa" in t["cell"]]
        redirected = [b for t in repa for b in t["bindings"]]
        if quick:  # quick trials read quick encoders, made under the quick study's folder
            assert len(redirected) == len(repa) and all(
                re.match(r"(digit|sequence)_encoder_from.path = ", b) and str(study.folder / "prerequisites") in b
                for b in redirected)
        else:
            assert not redirected


# ---- a quick study on Ray Tune and MLflow ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_study_end_to_end_resume_and_report_only(ray_local, in_tmp):
    from mlflow.tracking import MlflowClient

    study_file = in_tmp / "tiny.gin"
    study_file.write_text(TINY_STUDY)
    study = plan_study(study_file, quick=True, runs_dir=in_tmp / "runs")
    result = run_study(study, sections=["main"])
    assert not result.failed and result.skipped == {"objectives": 0}
    assert result.report.finished == 4 and result.report.planned == 8  # the 'later' section did not run
    report = (in_tmp / "runs" / "studies" / "tiny-quick" / "RESULTS.md")
    assert result.report.path == report
    text = report.read_text()
    assert "| main | objectives | 2 | 0, 1 | 4/4 |" in text and "| later | widths | 2 | 0, 1 | 0/4 |" in text
    assert "Quick budget" in text and "no preset matches digits/none*.gin" in text
    assert "paired t" in text and "| objectives:selfflow | objectives:fm |" in text

    result = run_study(study)  # the second sitting: only the widths sweep has anything to run
    assert result.skipped == {"objectives": 4, "widths": 0} and list(result.ran) == ["widths"]
    assert result.report.finished == 8
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study_tiny-quick")
    runs = client.search_runs([experiment.experiment_id], "tags.`study.key` != ''", max_results=100)
    keys = [r.data.tags["study.key"] for r in runs]
    assert len(runs) == 8 and len(set(keys)) == 8 and all(r.info.status == "FINISHED" for r in runs)
    report_runs = client.search_runs([experiment.experiment_id], "tags.`study.role` = 'report'")
    assert len(report_runs) == 1  # one report run, updated by every sitting
    assert "report/RESULTS.md" in {a.path for a in client.list_artifacts(report_runs[0].info.run_id, "report")}

    written = {p: p.read_bytes() for p in [report, *result.report.plots]}
    assert any(p.name == "scaling_5.png" for p in written) and any(p.name == "objectives_eval_fd.png" for p in written)
    for path in written:
        path.unlink()
    again = run_study(study, report_only=True)
    assert again.ran == {} and {p: p.read_bytes() for p in [again.report.path, *again.report.plots]} == written


# ---- killed mid-way, then resumed ------------------------------------------------------------------


def finished_runs(db: Path) -> dict[str, str]:
    """study.key -> run id of the FINISHED trial runs, read straight from the SQLite store."""
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as connection:
        try:
            rows = connection.execute(
                "SELECT t.value, r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'study.key' AND r.status = 'FINISHED'").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return {}
    return {key: run_id for key, run_id in rows}


def study_command(study_file: Path, runs: Path) -> list[str]:
    return [sys.executable, "-m", "selfflow.platform.cli", "study", str(study_file), "--quick", "--runs", str(runs)]


def processes_using(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_killed_study_resumes_without_rerunning_finished_trials(in_tmp, tmp_path_factory):
    study_file = in_tmp / "killed.gin"
    study_file.write_text(KILL_STUDY)
    runs = in_tmp / "runs"
    db = runs / "mlflow.db"
    ray_tmp = Path(f"/tmp/sf_study_{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = dict(os.environ, SELFFLOW_RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ADDRESS", None)
    log = open(in_tmp / "first.log", "w")
    process = subprocess.Popen(study_command(study_file, runs), stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not finished_runs(db):
            assert process.poll() is None, (in_tmp / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the study, its Ray cluster and its trials, all at once
        process.wait()
        log.close()
    before = finished_runs(db)
    assert 1 <= len(before) < 4, "the kill must come mid-way"
    deadline = time.monotonic() + 60
    while processes_using(str(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_using(str(ray_tmp)), "the killed study left processes behind"

    resumed = subprocess.run(study_command(study_file, runs), capture_output=True, text=True, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"4 trials, {len(before)} finished before, {4 - len(before)} to run" in resumed.stdout
    after = finished_runs(db)
    assert len(after) == 4
    assert {k: after[k] for k in before} == before  # the finished trials are the same runs, not reruns
    points = [json.loads(p.read_text()) for p in (runs / "studies" / "killed-quick" / "sittings").glob("*/fm/points.json")]
    second = [p for p in points if len(p) == 4 - len(before)]
    assert second and not {point["tags"]["study.key"] for point in second[0]} & set(before)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        per_key = dict(connection.execute("SELECT t.value, COUNT(*) FROM tags t WHERE t.key = 'study.key' "
                                          "GROUP BY t.value").fetchall())
    assert all(per_key[key] == 1 for key in before)  # no second run of a finished trial


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigint_ends_the_sitting_in_its_sweep_and_marks_it_killed(in_tmp):
    study_file = in_tmp / "interrupted.gin"
    study_file.write_text(INTERRUPT_STUDY)
    runs = in_tmp / "runs"
    db = runs / "mlflow.db"
    ray_tmp = Path(f"/tmp/sf_stint_{os.getpid()}")
    env = dict(os.environ, SELFFLOW_RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(study_command(study_file, runs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not finished_runs(db):  # mid-way through the first sweep: its first trial is done
            assert process.poll() is None, process.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)  # the study process alone, as `pkill -INT` does
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, output[-3000:]
    assert "selfflow sweep: SIGINT: stopping the trials" in output
    assert "study interrupted by SIGINT in sweep fm" in output, output[-3000:]
    assert "later: " not in output  # the next sweep never started
    sittings = list((runs / "studies" / "interrupted-quick" / "sittings").glob("*"))
    assert len(sittings) == 1 and not (sittings[0] / "later").exists()
    assert "stopped by SIGINT" in (sittings[0] / "fm" / "summary.txt").read_text()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        parents = connection.execute("SELECT r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                                     "WHERE t.key = 'sweep.role' AND t.value = 'parent'").fetchall()
    assert parents == [("KILLED",)]
    deadline = time.monotonic() + 60
    while processes_using(str(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not processes_using(str(ray_tmp)), "the interrupted study left processes behind"
