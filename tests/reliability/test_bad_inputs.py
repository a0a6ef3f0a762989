"""The bad-input corpus (tests/bad_inputs/): every case, run through the real CLI in its
own process, exits non-zero with exactly one line on stderr that names the problem.

The gin cases are tests/bad_inputs/gin/*.gin (`# expect: REGEX` on the first line);
the others (damaged/unsafe shards and checkpoints, missing paths, unreachable tracking)
are built by tests/bad_inputs/cases.py. A fork server (cli_forkserver.py) imports the
CLI once and forks a fresh process per case; two cases also run as plain `selfflow`
subprocesses to show the fork server changes nothing.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import REPO_ROOT, cli_env, run_cli, write_tiny_gin

sys.path.insert(0, str(REPO_ROOT / "tests" / "bad_inputs"))
from cases import CASE_ENV, CASES, PAYLOAD_MARKER  # noqa: E402

GIN_CASES = sorted((REPO_ROOT / "tests" / "bad_inputs" / "gin").glob("*.gin"))
CORPUS_SIZE = len(GIN_CASES) + len(CASES)


def _expectation(gin_file: Path) -> str:
    first = gin_file.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{gin_file.name} must start with '# expect: REGEX'"
    return first.removeprefix("# expect: ")


class ForkServer:
    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_forkserver.py"))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=cli_env(),
            cwd=folder,
        )
        ready = self.process.stdout.readline()
        assert json.loads(ready) == {"ready": True}, ready

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        self.count += 1
        out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
        request = {"argv": argv, "cwd": str(cwd), "env": env or {}, "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        return answer["code"], out.read_text(), err.read_text()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    server = ForkServer(tmp_path_factory.mktemp("forkserver"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, digits_root, spoken_digits_root) -> Path:
    """A folder with data/digits, data/spoken_digits and tiny.gin, like a user's working directory."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    (folder / "data").mkdir()
    (folder / "data" / "digits").symlink_to(digits_root)
    (folder / "data" / "spoken_digits").symlink_to(spoken_digits_root)
    write_tiny_gin(folder, "tiny", steps=4, log_every=2, checkpoint_every=2)
    return folder


def _assert_one_clear_line(code: int, stderr: str, expect: str, exit_code: int = 2) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-3000:]}"
    line = lines[0]
    assert line.startswith("selfflow: error: "), line
    assert re.search(expect, line), f"{line!r} does not match {expect!r}"
    assert code == exit_code, f"exit code {code} (expected {exit_code}): {line}"
    return line


@pytest.mark.parametrize("gin_file", GIN_CASES, ids=[p.stem for p in GIN_CASES])
def test_bad_gin_file(gin_file, forkserver, workspace):
    argv = ["train", "--gin_file", str(gin_file), "--run-dir", f"run_{gin_file.stem}", "--no-tracking", "--quiet"]
    code, _, stderr = forkserver.run(argv, workspace)
    _assert_one_clear_line(code, stderr, _expectation(gin_file))
    assert not (workspace / f"run_{gin_file.stem}" / "checkpoints").exists()  # nothing trained
    assert not (workspace / "PWNED_BY_GIN").exists()  # gin never ran Python


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_case(case, forkserver, workspace):
    argv = case.build(workspace)
    env = CASE_ENV[case.name]() if case.name in CASE_ENV else {}
    code, _, stderr = forkserver.run(argv, workspace, env)
    _assert_one_clear_line(code, stderr, case.expect, case.exit_code)
    assert not (workspace / PAYLOAD_MARKER).exists()  # nothing was unpickled


def test_plain_subprocess_agrees(workspace):
    """The real `selfflow` executable, no fork server: same single line, same exit code
    (tests/unit/test_config_errors.py does the same for a gin typo)."""
    gin_file = REPO_ROOT / "tests" / "bad_inputs" / "gin" / "missing_shard_set.gin"
    out = run_cli(["train", "--gin_file", str(gin_file), "--no-tracking", "--quiet"], workspace, timeout=300)
    _assert_one_clear_line(out.returncode, out.stderr, _expectation(gin_file))


def test_corpus_size():
    print(f"\nbad-input corpus: {CORPUS_SIZE} cases ({len(GIN_CASES)} gin files, {len(CASES)} built cases)")
    assert CORPUS_SIZE >= 40


def test_nan_stop_keeps_the_last_good_checkpoint(forkserver, workspace):
    from selfflow.platform.train import checkpoint as ckpt

    case = next(c for c in CASES if c.name == "nan_loss")
    run = workspace / "run_nan"
    if not run.exists():
        forkserver.run(case.build(workspace), workspace)
    assert [step for step, _ in ckpt.list_checkpoints(run / "checkpoints")] == [1]
    newest = ckpt.latest(run / "checkpoints")
    assert ckpt.verify(newest) is None and ckpt.load(newest)["step"] == 1
