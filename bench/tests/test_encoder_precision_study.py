"""bench/studies/encoder_precision.py on a small timm ViT: it times REPA's target in both precisions
through TimmEncoder's weights-from-file path and reports the gap between them."""
from __future__ import annotations

import re

import pytest


def test_the_study_times_both_precisions_and_reports_a_small_nonzero_gap(capsys, bench_study):
    study = bench_study("encoder_precision")
    study.main(["--model", "vit_tiny_patch16_224", "--image-size", "32", "--batch", "2", "--rounds", "2"])
    report = capsys.readouterr().out
    assert "grid (2, 2), 192 features" in report
    assert re.search(r"float32: median \d+ ms", report) and re.search(r"bfloat16: median \d+ ms", report)
    assert float(re.search(r"bfloat16 / float32: ([0-9.]+)", report).group(1)) > 0
    relative = float(re.search(r"relative error of the features ([0-9.e+-]+)", report).group(1))
    mean_gap, max_gap = (float(v) for v in re.search(r"mean ([0-9.e+-]+), max ([0-9.e+-]+)", report).groups())
    assert 0 < relative < 0.1 and 0 < mean_gap <= max_gap < 0.05
    with pytest.raises(SystemExit):
        study.main(["--rounds", "1"])
