"""Connect to Ray: an existing cluster (RAY_ADDRESS) or a local one sized to this machine.

Local clusters are started with deliberate settings:
  * token authentication on, with a random per-session token handed to Ray through the
    environment (RAY_AUTH_TOKEN) so nothing is written to ~/.ray;
  * no dashboard unless SELFFLOW_RAY_DASHBOARD=1 (it then binds to 127.0.0.1 only; it needs
    `ray[default]`);
  * every Ray service of the local cluster listens on the loopback interface only (node address
    127.0.0.1): nothing on the network can reach it, token or not;
  * session files under SELFFLOW_RAY_TMPDIR (default /tmp/ray_selfflow-<uid>)/ray, never in $HOME:
    the outer folder is owned by this user with mode 0700 (created so, tightened if it is ours,
    refused if it is not), so other users can neither read Ray's logs and sockets nor plant files,
    although Ray makes its own folder inside it world-writable;
  * logical CPUs = os.cpu_count(), so the scheduler never promises cores that do not exist.
An existing cluster is used as it is: its token (if it has auth on) comes from the caller's
RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Mapping

from selfflow.platform.errors import UserError

LOOPBACK = "127.0.0.1"
# Ray re-resolves a loopback node address to the machine's network address unless it runs in its
# single-machine mode, which this switch selects (read by Ray's processes from the environment).
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def default_tmp_dir() -> str:
    """Per user: one user's Ray session files never mix with another's."""
    return f"/tmp/ray_selfflow-{os.getuid()}"


def private_tmp_dir(path: str | os.PathLike) -> str:
    """`path` as a folder only this user can enter (mode 0700): created so, tightened when it is
    ours, UserError when another user owns it (it could hold their planted files)."""
    folder = os.path.abspath(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = os.lstat(folder)
    except OSError as error:
        raise UserError(f"Ray temp folder {folder}: {error.strerror or error}") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"Ray temp folder {folder} is not a plain folder (a link or a file): set SELFFLOW_RAY_TMPDIR")
    if info.st_uid != os.getuid():
        raise UserError(f"Ray temp folder {folder} belongs to another user (uid {info.st_uid}): set "
                        f"SELFFLOW_RAY_TMPDIR to a folder of your own")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)
    return folder
# Ray Train's helpers poll the State API, which lives in the dashboard; without it they only warn.
_NOISY_LOGGERS = (
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    "ray.train.v2._internal.state.state_actor",
)
_started_here = False


@dataclass(frozen=True)
class ClusterInfo:
    address: str
    local: bool
    num_cpus: float
    num_gpus: float


def setup_worker_process() -> None:
    """Runs in every Ray worker process (runtime_env worker_process_setup_hook)."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _prepare_environment(local: bool) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The state actor's reconciliation needs the State API (dashboard): off unless a dashboard runs.
    if not _env_flag("SELFFLOW_RAY_DASHBOARD"):
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION", "0")
    if local:
        _single_machine()
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
        if os.environ["RAY_AUTH_MODE"].lower() == "token" and not has_token:
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # lives in this process tree only
    _refresh_ray_config()


def _single_machine() -> None:
    """Ray's single-machine mode, so that its services bind to 127.0.0.1 (see LOOPBACK): for the
    processes it starts (environment) and for this one, whose Ray may be imported already."""
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):
        pass


def _refresh_ray_config() -> None:
    """Ray caches its config and token when first imported; make it see the environment above."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # a Ray without token auth: nothing cached
        pass


def connect(address: str | None = None, *, num_cpus: int | None = None,
            worker_env: Mapping[str, str] | None = None) -> ClusterInfo:
    """Use the running Ray, or connect to `address`/RAY_ADDRESS, or start a local cluster.
    worker_env: environment variables every worker process of this job starts with (the host
    preset's, platform/host.py); a Ray this process already joined keeps the environment it has."""
    global _started_here
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    import ray

    setup_worker_process()
    if not ray.is_initialized():
        _prepare_environment(local)
        runtime_env: dict = {"worker_process_setup_hook": "selfflow.platform.scale.ray_cluster.setup_worker_process"}
        if worker_env:
            runtime_env["env_vars"] = dict(worker_env)
        try:
            if local:
                dashboard = _env_flag("SELFFLOW_RAY_DASHBOARD")
                ray.init(
                    num_cpus=num_cpus or os.cpu_count(),
                    include_dashboard=dashboard,
                    dashboard_host=LOOPBACK,
                    _node_ip_address=LOOPBACK,
                    # Ray makes its temp folder world-writable (0777): it lives inside the private one.
                    _temp_dir=os.path.join(private_tmp_dir(os.environ.get("SELFFLOW_RAY_TMPDIR") or default_tmp_dir()),
                                           "ray"),
                    runtime_env=runtime_env,
                    logging_level=logging.WARNING,
                )
                _started_here = True
            else:
                ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = address or "a local cluster"
            raise UserError(f"cannot start Ray ({where}): {str(error).strip().splitlines()[0][:200]}") from None
    resources = ray.cluster_resources()
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        local=_started_here,
        num_cpus=float(resources.get("CPU", 0.0)),
        num_gpus=float(resources.get("GPU", 0.0)),
    )


def shutdown() -> None:
    """Stop Ray if this process started the local cluster (a shared cluster is left running)."""
    global _started_here
    import ray

    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


def check_fits(cluster: ClusterInfo, workers: int, cpus_per_worker: float, gpus_per_worker: float, what: str) -> None:
    """Refuse a request the cluster can never satisfy (it would wait forever)."""
    need_cpus, need_gpus = workers * cpus_per_worker, workers * gpus_per_worker
    if need_cpus > cluster.num_cpus + 1e-9:
        raise UserError(
            f"{what} needs {workers} workers x {cpus_per_worker:g} CPU = {need_cpus:g} CPUs; "
            f"the Ray cluster has {cluster.num_cpus:g}"
        )
    if need_gpus > cluster.num_gpus + 1e-9:
        raise UserError(
            f"{what} needs {workers} workers x {gpus_per_worker:g} GPU = {need_gpus:g} GPUs; "
            f"the Ray cluster has {cluster.num_gpus:g}"
        )
