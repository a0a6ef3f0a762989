"""Test-only components, imported by test configs with a gin `import` line (the same plugin path a
researcher's own package takes): fault injectors and helpers that must run inside Ray workers.
tests/conftest.py puts tests/plugins on sys.path and on PYTHONPATH (for Ray workers and subprocesses)."""
