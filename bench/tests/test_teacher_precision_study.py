"""bench/studies/teacher_precision.py on a short digits Self-Flow run: it reads the run's EMA
backbone and reports how far a bfloat16 teacher moves the alignment target."""
from __future__ import annotations

import re

import pytest

from selfflow.platform.train.driver import train


def test_the_study_reports_a_small_nonzero_gap_and_refuses_a_folder_without_a_run(in_tmp, capsys, bench_study):
    params = ["TrainConfig.steps = 30", "TrainConfig.batch_size = 32", "TrainConfig.checkpoint_every = 0",
              "TrainConfig.eval_every = 0", "TrainConfig.ema_decay = 0.5", "SamplingConfig.steps = 2",
              "SamplingConfig.per_class = 1", "build_experiment.evaluation = None"]
    result = train(["digits/selfflow.gin"], params, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs",
                   progress=False)
    study = bench_study("teacher_precision")
    capsys.readouterr()
    study.main(["--run", str(result.run_dir)])
    report = capsys.readouterr().out
    assert "teacher block" in report
    relative = float(re.search(r"relative error of the features ([0-9.e+-]+)", report).group(1))
    mean_gap, max_gap = (float(v) for v in re.search(r"mean ([0-9.e+-]+), max ([0-9.e+-]+)", report).groups())
    # bfloat16 keeps 8 bits of mantissa: rounded, so not zero, but well under a percent per matmul.
    assert 0 < relative < 0.05 and 0 < mean_gap <= max_gap < 0.01
    with pytest.raises(SystemExit, match="no trained run in"):
        study.main(["--run", str(in_tmp / "nowhere")])
