"""`RunTracking`: the gin configurable of a run's optional tracking (platform/train/run_tracking.py)."""
from __future__ import annotations

from dataclasses import dataclass

from selfflow.platform.config.configurable import configurable
from selfflow.platform.errors import ConfigError


@dataclass(frozen=True)
class RunTrackingOptions:
    system_metrics: bool = False
    system_metrics_every_s: float = 10.0


@configurable("RunTracking", module="selfflow")
def run_tracking(system_metrics: bool = False, system_metrics_every_s: float = 10.0) -> RunTrackingOptions:
    """system_metrics: sample CPU, memory, disk, network (and GPU) every `system_metrics_every_s`
    seconds into the run's `system/...` metrics (MLflow's collectors, psutil)."""
    if not isinstance(system_metrics, bool):
        raise ConfigError(f"RunTracking.system_metrics must be True or False, got {system_metrics!r}")
    if isinstance(system_metrics_every_s, bool) or not isinstance(system_metrics_every_s, (int, float)) \
            or not system_metrics_every_s > 0:
        raise ConfigError(f"RunTracking.system_metrics_every_s must be a number > 0, got {system_metrics_every_s!r}")
    return RunTrackingOptions(system_metrics, float(system_metrics_every_s))
