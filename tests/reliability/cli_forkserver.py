"""Run many `selfflow` command lines as real processes without paying the imports each time.

Started once by the bad-input tests: it imports the CLI (torch, timm, gin, mlflow),
then for every request read from stdin (one JSON line: argv, cwd, env) forks a child
that runs `selfflow.platform.cli.main(argv)` with its stdout/stderr file descriptors
pointed at files, and exits with main's return code. The parent answers one JSON
line: {"code": exit status}. Each case thus gets its own process, exit status and
stderr, exactly like `selfflow ...` from a shell (minus ~10 s of imports).
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def _child(request: dict) -> None:
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.chdir(request["cwd"])
    for key in [k for k in os.environ if k.startswith(("MLFLOW_", "SELFFLOW_"))]:
        del os.environ[key]
    os.environ.update(request.get("env", {}))
    code = 1
    try:
        from selfflow.platform.cli import main

        code = main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # an uncaught exception is a test failure: keep the traceback
        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    # The children skip the CLI's start, where the host preset is applied before torch loads: apply
    # it here, before this process imports torch (every digits case asks for cpu_shared).
    from selfflow.platform import host

    host.apply_before_torch("cpu_shared")
    import mlflow.tracking  # noqa: F401  imported once here, not in every case

    import selfflow.platform.cli  # noqa: F401
    import selfflow.platform.train.driver  # noqa: F401
    from selfflow.platform.config import registry

    registry.register_all()  # imports every component family (timm, torchvision): the slow part

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        print(json.dumps({"code": code}), flush=True)


if __name__ == "__main__":
    serve()
