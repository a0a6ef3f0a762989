"""Mistakes a user will make get one clear line naming the file/line and a non-zero exit."""
import subprocess
import sys
from pathlib import Path

import pytest

from selfflow.platform.config import bootstrap as config
from selfflow.platform.errors import ConfigError


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def one_line(error: ConfigError) -> str:
    text = error.one_line()
    assert "\n" not in text
    return text


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.gin") as info:
        config.parse([str(tmp_path / "nope.gin")])
    one_line(info.value)


def test_missing_include_names_file_and_line(tmp_path):
    path = write(tmp_path, "a.gin", "# comment\ninclude 'digits/does_not_exist.gin'\n")
    with pytest.raises(ConfigError) as info:
        config.parse([path])
    text = one_line(info.value)
    assert "config file not found: digits/does_not_exist.gin" in text
    assert f"{path}:2" in text


def test_unknown_configurable_suggests(tmp_path):
    path = write(tmp_path, "a.gin", "include 'digits/fm.gin'\nDiTT.depth = 3\n")
    with pytest.raises(ConfigError) as info:
        config.parse([path])
    text = one_line(info.value)
    assert "unknown configurable 'DiTT'" in text and "did you mean 'DiT'" in text and f"{path}:2" in text


def test_unknown_parameter_suggests_closest(tmp_path):
    path = write(tmp_path, "a.gin", "include 'digits/fm.gin'\n\nDiT.hiden_dim = 32\n")
    with pytest.raises(ConfigError) as info:
        config.parse([path])
    text = one_line(info.value)
    assert "unknown parameter 'hiden_dim' of DiT" in text
    assert "did you mean 'hidden_dim'" in text and f"{path}:3" in text


def test_unknown_parameter_in_binding():
    with pytest.raises(ConfigError, match=r"--gin_param 1: unknown parameter 'step' of TrainConfig.*'steps'"):
        config.parse(["digits/fm.gin"], ["TrainConfig.step = 3"])


def test_wrong_value_type_names_line(tmp_path):
    path = write(tmp_path, "a.gin", "include 'digits/fm.gin'\nTrainConfig.steps = 'many'\n")
    with pytest.raises(ConfigError) as info:
        config.parse([path])
    text = one_line(info.value)
    assert "wrong type for TrainConfig.steps" in text and "expected int" in text and f"{path}:2" in text


def test_wrong_type_in_binding():
    with pytest.raises(ConfigError, match=r"--gin_param 2: wrong type for DiT.depth: got 2.5"):
        config.parse(["digits/fm.gin"], ["TrainConfig.steps = 3", "DiT.depth = 2.5"])


def test_malformed_syntax(tmp_path):
    path = write(tmp_path, "a.gin", "TrainConfig.steps = (3\n")
    with pytest.raises(ConfigError, match="malformed gin syntax") as info:
        config.parse([path])
    one_line(info.value)


def test_missing_required_binding(tmp_path):
    from selfflow.platform.config.experiment import build_from_gin

    path = write(tmp_path, "a.gin", "include 'data/digits.gin'\ninclude 'tokenizers/pixels_patch2.gin'\n")
    config.parse([path])
    with pytest.raises(ConfigError, match="missing required binding.*backbone"):
        build_from_gin()


def test_cli_exits_non_zero_with_one_line(tmp_path):
    path = write(tmp_path, "a.gin", "include 'digits/fm.gin'\nDiT.hiden_dim = 32\n")
    out = subprocess.run(
        [sys.executable, "-m", "selfflow.platform.cli", "train", "--gin_file", path, "--no-tracking"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfflow: error:") and "did you mean 'hidden_dim'" in lines[0]


def test_flatten_config():
    text = "A.x = 1\nB.y = [1,\n    2]\n# comment\nimport foo\n"
    assert config.flatten_config(text) == {"A.x": "1", "B.y": "[1, 2]"}
