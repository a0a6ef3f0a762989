"""Nothing unpickles untrusted data, gin reaches only registered configurables, and local
services bind to 127.0.0.1 unless a flag says otherwise."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from reliability_helpers import REPO_ROOT

from selfflow.platform.config import bootstrap as config
from selfflow.platform.errors import ConfigError

SOURCES = sorted([*(REPO_ROOT / "platform").rglob("*.py"), *(REPO_ROOT / "components").rglob("*.py")])


def _calls(pattern: str) -> list[tuple[Path, int, str]]:
    found = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(pattern, line) and not line.lstrip().startswith("#"):
                found.append((path.relative_to(REPO_ROOT), number, line.strip()))
    return found


def test_every_torch_load_is_weights_only():
    for path, number, line in _calls(r"torch\.load\("):
        assert "weights_only=True" in line, f"{path}:{number} loads without weights_only=True: {line}"


@pytest.mark.parametrize("pattern", [r"\bpickle\.loads?\(", r"\bdill\.", r"allow_pickle\s*=\s*True",
                                     r"\byaml\.load\(", r"\bmarshal\.loads?\(", r"\.decode\(\s*['\"]pil"])
def test_no_unpickling_anywhere(pattern):
    # Round-tripping an object we just made ourselves (a picklability check) reads no outside data.
    found = [call for call in _calls(pattern) if "pickle.loads(pickle.dumps(" not in call[2]]
    assert found == []


def test_a_gin_import_runs_only_the_module_it_names_and_reaches_only_registered_configurables(tmp_path, monkeypatch):
    """Importing is the user's trust decision (docs/reliability.md): the module's code runs, but the
    config can still reach only what the module registered, never an arbitrary callable in it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab_module.py").write_text("import os\nopen('IMPORTED', 'w').close()\ndef hello():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "lab.gin"
    path.write_text("import lab_module\ninclude 'digits/fm.gin'\nbuild_experiment.name = @hello()\n")
    with pytest.raises(ConfigError, match=r"unknown configurable 'hello"):
        config.parse([str(path)])
    assert (tmp_path / "IMPORTED").exists()
    path.write_text("import lab_module\ninclude 'digits/fm.gin'\nbuild_experiment.name = @os.system()\n")
    with pytest.raises(ConfigError, match=r"unknown configurable 'os\.system"):
        config.parse([str(path)])


def test_dynamic_registration_cannot_call_os_system(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.gin"
    path.write_text("from __gin__ import dynamic_registration\nimport os\n"
                    "import selfflow.platform.config.experiment as exp\n"
                    "exp.build_experiment.name = @os.system()\nos.system.command = 'touch PWNED'\n")
    with pytest.raises(ConfigError, match="is not allowed"):
        config.parse([str(path)])
    assert not (tmp_path / "PWNED").exists()


def test_worker_config_strings_are_guarded_too():
    """Ray workers rebuild gin from a string: the same rules apply there."""
    with pytest.raises(ConfigError, match="gin 'from __gin__ import dynamic_registration' is not allowed"):
        config.parse_config_string("from __gin__ import dynamic_registration\nimport os\n")
    with pytest.raises(ConfigError, match="gin 'import selfflow_no_such_lab': no such module"):
        config.parse_config_string("import selfflow_no_such_lab\n")


def test_unregistered_callable_is_unknown():
    with pytest.raises(ConfigError, match=r"unknown configurable 'os.system'"):
        config.parse(["digits/fm.gin"], ["build_experiment.backbone = @os.system"])


def test_ui_binds_to_localhost_unless_asked():
    from selfflow.platform.cli import build_parser, ui_command

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    command = ui_command(args.runs, args.host, args.port, tracking_uri="sqlite:///x.db")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    exposed = build_parser().parse_args(["ui", "--host", "0.0.0.0"])
    assert exposed.host == "0.0.0.0"  # only when the flag says so


def test_nothing_binds_all_interfaces_by_default():
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "--host 127.0.0.1" in makefile and "0.0.0.0" not in makefile
    for path, number, line in _calls(r"0\.0\.0\.0"):
        assert "help=" in line or "warning" in line, f"{path}:{number} binds all interfaces: {line}"
