"""The report follows each target across the full runs on record (platform/bench_history.py)."""
from __future__ import annotations

import json
import math

import pytest

from bench import run as bench
from bench.core import Section, Target
from bench.history import histories, read_records, target_history
from bench.report import render_history, render_report

DIGITS = {"item": "objective", "metric": "selfflow_over_fm", "config": "digits"}


def record(run: str, value: float, minute: int, *, quick: bool = False, dirty: bool = False, **fields) -> dict:
    return {"run_id": run, "git_commit": f"{run}0000000", "git_dirty": dirty, "quick": quick,
            "timestamp": f"2026-11-30T10:{minute:02d}:00+00:00", "value": value, **{**DIGITS, **fields}}


def ratio_target(value: float = 1.3) -> Target:
    return Target("Self-Flow / FM, digits", value, 1.25, "<=", record=DIGITS)


def test_history_keeps_the_last_full_clean_runs_of_the_target_oldest_first():
    records = [
        record("r1", 1.40, 1),
        record("r2", 1.20, 2),
        record("r3", 1.10, 3, quick=True),                 # smoke sizes: not counted
        record("r4", 1.00, 4, dirty=True),                 # uncommitted code: not counted
        record("r5", 1.24, 5, config="S"),                 # another config
        record("r5", 1.30, 5),
        record("r6", 9.99, 6, metric="fm_over_fm"),        # another metric
        record("r7", 1.26, 7),
        record("r7", 1.22, 8),                             # recorded twice: the run's last value counts
        {"run_id": "r8", "item": "machine", "metric": "info", "value": 0},
    ]
    history = target_history(records, ratio_target(), last_runs=3)
    assert [run.run_id for run in history.runs] == ["r2", "r5", "r7"]  # r1 is the 4th-last
    assert [run.value for run in history.runs] == [1.20, 1.30, 1.22]
    assert history.count == 3 and history.met_count == 2  # 1.20 and 1.22 <= 1.25
    assert history.median == 1.22 and history.value_range == (1.20, 1.30)
    assert history.commits == ("r200000", "r700000")
    assert target_history(records, ratio_target()).count == 4


def test_values_below_missing_below_mean_not_reached():
    heun = {"item": "sampling", "metric": "heun_nfe"}
    target = Target("Heun NFE", 15.0, 32, "<=", record=heun, missing_below=0)
    records = [record(f"r{i}", nfe, i, **heun) for i, nfe in enumerate((15, -1, 11, 20))]
    history = target_history(records, target)
    assert history.missing_count == 1 and history.met_count == 3  # the missing run did not meet it
    assert history.median == 15 and history.value_range == (11, 20)
    assert math.isnan(history.runs[1].value)
    empty = target_history([], target)
    assert empty.count == 0 and math.isnan(empty.median) and empty.commits == ("", "")


def test_history_rejects_a_target_without_a_record_and_bad_run_counts():
    with pytest.raises(ValueError, match="names no record"):
        target_history([], Target("x", 1.0, 1.0, "<="))
    with pytest.raises(ValueError, match="last_runs"):
        target_history([], ratio_target(), last_runs=0)
    only_followed = histories([], [Target("x", 1.0, 1.0, "<="), ratio_target()])
    assert [h.target.name for h in only_followed] == ["Self-Flow / FM, digits"]


def test_read_records_names_the_line_at_fault(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(record("r1", 1.3, 1)) + "\n\n" + '{"value": 1,\n')
    with pytest.raises(ValueError, match=r"results.jsonl:3: not a JSON line"):
        read_records(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"results.jsonl:1: expected a JSON object, got list"):
        read_records(path)
    path.write_text(json.dumps(record("r1", 1.3, 1)) + "\n\n")
    assert [r["run_id"] for r in read_records(path)] == ["r1"]


def test_the_report_shows_the_between_runs_table():
    target = ratio_target()
    heun = Target("Heun NFE", float("nan"), 32, "<=", record={"item": "sampling"}, missing_below=0)
    records = [record("r1", 1.40, 1), record("r2", 1.20, 2),
               record("r3", -1, 3, item="sampling", metric="x", config=None)]
    followed = histories(records, [target, heun])
    lines = render_history(followed, {id(target): 1, id(heun): 5}, counted=True)
    assert "| 1 | Self-Flow / FM, digits | 2 | 1 | 1.3 | 1.2-1.4 | r100000 .. r200000 |" in lines
    assert "| 5 | Heun NFE | 1 | 0 | - | - (1 without a value) | r300000 |" in lines
    assert any("this one included" in line for line in lines)
    assert any("not this one" in line for line in render_history(followed, {}, counted=False))
    assert render_history([], {}, counted=True) == []
    section = Section("objective", "Objective cost", "cmd", "meaning", targets=[target])
    text = render_report([section], {}, {"command": "bench", "git_commit": "abc"}, 1.0, followed[:1])
    assert "### Between runs" in text and text.index("## Targets") < text.index("### Between runs")
    assert "comes on top of it: \"Between runs\" below shows it." in text
    alone = render_report([section], {}, {"command": "bench"}, 1.0)
    assert "### Between runs" not in alone and "comes on top of it." in alone


def test_main_follows_targets_across_runs_and_refuses_a_broken_results_file(tmp_path, monkeypatch):
    values = iter((1.40, 1.20))

    def fake_item(name, ctx):
        value = next(values)
        ctx.results.record("objective", "selfflow_over_fm", value, "ratio", config="digits")
        return Section(name, "Objective cost", "cmd", "meaning", targets=[Target("SF / FM", value, 1.25, "<=",
                                                                                 record=DIGITS)])

    real_run_info = bench.new_run_info
    monkeypatch.setattr(bench, "new_run_info", lambda quick, command: {**real_run_info(quick, command),
                                                                        "git_commit": "c0ffee1234", "git_dirty": False})
    monkeypatch.setattr(bench, "run_item", fake_item)
    out, results = tmp_path / "BENCH.md", tmp_path / "history.jsonl"
    arguments = ["--only", "objective", "--out", str(out), "--history", str(results), "--results", "",
                 "--cache", str(tmp_path / "c")]
    assert bench.main(arguments) == 0 and bench.main(arguments) == 0
    assert "| 1 | SF / FM | 2 | 1 | 1.3 | 1.2-1.4 | c0ffee1 |" in out.read_text()

    results.write_text(results.read_text() + "not json\n")
    before = results.read_text()
    with pytest.raises(SystemExit, match=r"history.jsonl:\d+: not a JSON line"):
        bench.main(arguments)
    assert results.read_text() == before  # refused before measuring or appending anything
