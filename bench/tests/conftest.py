"""The benchmark tests reuse the test suite's shared fixtures (data built once per session)."""
from tests.conftest import bench_study, digits_root, in_tmp  # noqa: F401
