"""The repo's platform/ folder must never shadow the standard library's `platform`."""
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # not from conftest: bench/tests has one of that name too


def test_stdlib_platform_in_process():
    import platform

    import selfflow.platform.config.bootstrap  # noqa: F401  our engine is importable next to it

    assert platform.system()
    assert hasattr(platform, "python_version")


def test_stdlib_platform_in_subprocess_from_repo_root():
    # `python -c` puts the working directory first on sys.path: the worst case.
    code = "import platform, sys; print(platform.system()); import selfflow.platform.train.trainer; import torch"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[0] in {"Linux", "Darwin", "Windows"}


def test_no_init_at_platform_folder():
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()
    assert not (REPO_ROOT / "__init__.py").exists()
