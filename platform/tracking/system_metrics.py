"""System metrics (CPU, memory, disk, network, GPU when present) sampled in a background thread.

The collectors are MLflow's own (mlflow.system_metrics, built on psutil), plus this process's CPU
and resident memory: on a shared machine the machine-wide figures include other people's work. The
names carry MLflow's `system/` prefix, so the UI shows them on the run's "System metrics" tab.

Unlike MLflow's SystemMetricsMonitor, this thread never talks to the store: `take()` hands the
averages since the last call to the caller, which logs them through its tracker, so they travel
through the run's journal (an outage loses none) and only the training thread touches the tracker.
"""
from __future__ import annotations

import threading

PREFIX = "system/"


def _monitors() -> list:
    """MLflow's collectors: CPU and memory, disk, network, and a GPU monitor when a GPU answers."""
    from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    class ProcessMonitor(BaseMetricsMonitor):
        """This process: CPU percent (100 = one core busy) and resident memory."""

        def __init__(self):
            import psutil

            super().__init__()
            self.process = psutil.Process()
            self.process.cpu_percent()  # the first call only starts psutil's interval

        def collect_metrics(self):
            self._metrics["process_cpu_percentage"].append(self.process.cpu_percent())
            self._metrics["process_memory_rss_megabytes"].append(self.process.memory_info().rss / 1e6)

        def aggregate_metrics(self):
            return {key: round(sum(values) / len(values), 1) for key, values in self._metrics.items() if values}

    monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor(), ProcessMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:  # no NVIDIA GPU (or no pynvml): MLflow's own monitor skips GPUs the same way
        pass
    return monitors


class SystemMetricsSampler:
    """Samples every `interval_s` seconds in a daemon thread; `take()` returns the averages since the
    previous `take()` (empty when no sample was taken in between)."""

    def __init__(self, interval_s: float = 10.0):
        if not interval_s > 0:
            raise ValueError(f"system metrics interval must be > 0 seconds, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitors: list = []
        self._samples = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        import psutil

        psutil.cpu_percent()  # CPUMonitor's first reading would otherwise cover all time since boot
        self._monitors = _monitors()
        self._thread = threading.Thread(target=self._run, name="selfflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one sample now (the thread calls this every interval)."""
        with self._lock:
            for monitor in self._monitors:
                monitor.collect_metrics()
            self._samples += 1

    def take(self) -> dict[str, float]:
        with self._lock:
            if not self._samples:
                return {}
            metrics = {}
            for monitor in self._monitors:
                metrics.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
            self._samples = 0
        return {PREFIX + key: float(value) for key, value in metrics.items()}

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None
