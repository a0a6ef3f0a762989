"""The benchmark tests reuse the test suite's shared fixtures (data built once per session).

tests/ is not a package (a `tests` package from another distribution may shadow the name), so its
conftest is loaded from its file."""
import importlib.util
from pathlib import Path

_SHARED = Path(__file__).resolve().parents[2] / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("selfflow_tests_conftest", _SHARED)
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

bench_study, digits_root, in_tmp = _shared.bench_study, _shared.digits_root, _shared.in_tmp
