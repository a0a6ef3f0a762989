"""Data-parallel training on Ray Train (TorchTrainer): `selfflow train ... --workers N`.

The launcher (`train_distributed`) parses the gin files once, opens the MLflow run and ships a
`RunSpec` (platform/train/driver.py); every worker runs the one driver, `run_training`, with its
rank, the DDP wrapper and a report callback. Only rank 0 logs and writes checkpoints.

Every rank reads its own shard of the data (ShardData.loader(rank, world_size): the same number
of batches on every rank) and takes exactly TrainConfig.steps steps: gloo hangs when ranks
disagree on the step count. TrainConfig.batch_size is the global batch: each worker takes
TrainConfig.micro_batch (default batch_size / workers) per forward, accumulating when
batch_size > workers x micro_batch. Evaluation runs in a separate process from an EMA snapshot
(TrainConfig.eval_mode 'auto'), so no rank waits for it inside a collective.

Fault tolerance: rank 0 reports each checkpoint to Ray Train (`ray.train.report`), Ray's
FailureConfig restarts a dead worker group, and the new group resumes from the newest
checkpoint (Ray's, else the run folder's) inside the same MLflow run.
"""
from __future__ import annotations

import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from selfflow.platform import host
from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.devices import parse_device, resolve_device
from selfflow.platform.errors import DEBUG_ENV, ConfigError, TrainingError, UserError, debug_enabled, first_line
from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, check_sqlite_store, tracking_uri_for
from selfflow.platform.tracking.provenance import unique_run_name
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train import run_folder
from selfflow.platform.train.driver import PreparedRun, RunResult, RunSpec, launch_tags, prepare, run_training
from selfflow.platform.train.interrupts import (RunInterrupted, acknowledge_stop, clear_stop_request, request_stop,
                                                requested_stop, stopped_at_step)
from selfflow.platform.train.parallel import ddp_wrapper

ReportFn = Callable[[dict[str, float], "Path | None"], None]
"""(metrics, checkpoint file or None) -> None; called on every rank at the same steps."""


def plain_error(error: BaseException) -> Exception:
    """A picklable copy of `error`: its one-line message, or under --debug its message followed by
    the worker's full traceback.

    gin re-raises errors from configurables as dynamically made proxy subclasses that do not
    pickle; Ray must pickle a worker's error to hand it to the driver.
    """
    message = " ".join(str(error).strip().splitlines()[0].split()) if str(error).strip() else type(error).__name__
    if debug_enabled() and not isinstance(error, (UserError, TrainingError)):
        message += "\n" + "".join(traceback.format_exception(error)).rstrip()
    for cls in type(error).__mro__:
        if not issubclass(cls, Exception):
            continue
        try:
            copy = cls(message)
            pickle.loads(pickle.dumps(copy))
        except Exception:
            continue
        return copy
    return RuntimeError(f"{type(error).__name__}: {message}")


class FrameworkReport:
    """Hands metrics (and the newest checkpoint written since the last report) to Ray Train or Tune.

    Runs on every rank at the same steps (log steps, checkpoint steps, the last step):
    `ray.train.report` is a collective. Must come after CheckpointEvery in the callbacks.
    Checkpoints are written on a background thread: one still being written is reported at a
    later report step (the last step's is waited for).
    """

    def __init__(self, report: ReportFn, verbose: bool = False):
        self.report = report
        self.verbose = verbose
        self.reported: Path | None = None

    def on_step_end(self, trainer, logs) -> None:
        config = trainer.config
        last = trainer.step == config.steps
        saved = last or (config.checkpoint_every and trainer.step % config.checkpoint_every == 0)
        if not (saved or trainer.step % config.log_every == 0):
            return
        metrics = {key: value for key, (_, value) in trainer.tracker.latest.items()}
        metrics["step"] = float(trainer.step)
        if self.verbose and trainer.rank == 0:
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in ("loss/total", "train/samples_per_s") if k in metrics)
            print(f"selfflow: step {trainer.step}/{config.steps} {shown}", flush=True)
        path = trainer.writer.completed if trainer.rank == 0 else None
        if path is not None and (path == self.reported or not path.is_file()):
            path = None
        if path is not None:
            self.reported = path
        self.report(metrics, path)


def report_with_checkpoint(report_fn: Callable[..., None], checkpoint_cls) -> ReportFn:
    """Adapt ray.train.report / ray.tune.report: a checkpoint file travels in its own folder."""

    def report(metrics: dict[str, float], path: Path | None) -> None:
        if path is None:
            report_fn(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix="selfflow-report-"))
        try:
            try:
                os.link(path, folder / path.name)
            except OSError:
                shutil.copy2(path, folder / path.name)
            report_fn(metrics, checkpoint=checkpoint_cls.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return report


def load_framework_checkpoint(checkpoint) -> tuple[Path | None, dict[str, Any] | None]:
    """The state inside a Ray Checkpoint (a folder holding one step-*.pt), or (None, None)."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as folder:
        found = ckpt.list_checkpoints(folder)
        if not found:
            return None, None
        path = found[-1][1]
        return path, ckpt.load(path)


def newest_state(framework_checkpoint, checkpoint_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newer of Ray's checkpoint and the run folder's (a crash may fall between writing
    one and reporting it); Ray's alone when the run folder is not shared with this node."""
    source, state = load_framework_checkpoint(framework_checkpoint)
    ckpt.clean_temp_files(checkpoint_dir)
    local = ckpt.latest(checkpoint_dir)
    if local is not None and (state is None or ckpt.list_checkpoints(checkpoint_dir)[-1][0] > int(state["step"])):
        source, state = ckpt.load_latest(checkpoint_dir)
    return source, state


def train_in_ray(spec: RunSpec, report_fn: Callable[..., None], checkpoint_cls, framework_checkpoint, *,
                 rank: int = 0, world_size: int = 1,
                 choose_device: Callable[[str], torch.device] | None = None) -> RunResult:
    """One Ray Train worker or one single-worker Tune trial: the one driver, reporting to Ray."""
    restored = newest_state(framework_checkpoint, Path(spec.run_dir) / "checkpoints")
    return run_training(
        spec, rank=rank, world_size=world_size, restored=restored,
        extra_callbacks=[FrameworkReport(report_with_checkpoint(report_fn, checkpoint_cls), verbose=spec.progress)],
        wrap_module=ddp_wrapper() if world_size > 1 else None,
        choose_device=choose_device or (lambda configured: worker_device(False, configured)),
    )


def worker_device(use_gpu: bool, configured: str) -> torch.device:
    """A Ray worker's device: Ray reserves GPUs (--gpus-per-worker) and makes only the reserved ones
    visible, so a worker with one trains on its GPU and a worker without one on the CPU."""
    if use_gpu:
        return resolve_device("cuda")
    named = parse_device(configured)
    if named is not None and named.type != "cpu":
        raise ConfigError(f"TrainConfig.device is {configured!r} but the Ray workers reserve no GPU: "
                          f"pass --gpus-per-worker, or use 'auto' or 'cpu'")
    return torch.device("cpu")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    import ray.train

    spec: RunSpec = loop_config["spec"]
    context = ray.train.get_context()
    choose_device = None
    if loop_config["use_gpu"]:
        import ray.train.torch

        def choose_device(configured: str) -> torch.device:
            return ray.train.torch.get_device()  # this worker's GPU among those visible on its node
    try:
        train_in_ray(spec, ray.train.report, ray.train.Checkpoint, ray.train.get_checkpoint(),
                     rank=context.get_world_rank(), world_size=context.get_world_size(), choose_device=choose_device)
    except RunInterrupted as stopped:
        # The launcher's stop request, met by every rank at the same step: end normally (an error
        # would make Ray restart the group), tell the launcher where, and hand Ray the checkpoint.
        if context.get_world_rank() == 0:
            acknowledge_stop(Path(spec.run_dir), stopped.step or 0)
        report = report_with_checkpoint(ray.train.report, ray.train.Checkpoint)
        report({"step": float(stopped.step or 0)}, stopped.checkpoint)  # a collective: every rank reports
    except Exception as error:
        raise plain_error(error) from None


# ---- the launcher ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scaling:
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2

    def __post_init__(self):
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise UserError(f"cpus per worker must be positive, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise UserError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.max_failures < -1:
            raise UserError(f"max_failures must be >= -1 (-1: retry forever), got {self.max_failures}")


def make_torch_trainer(spec: RunSpec, scaling: Scaling, storage_path: str | Path, name: str, callbacks=(),
                       timeout_s: float = 1800.0):
    """A TorchTrainer that runs `train_loop_per_worker` (gloo on CPU, NCCL on GPU); timeout_s: how long
    a collective waits for a slow rank (TrainConfig.process_group_timeout_s)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "use_gpu": use_gpu},
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(math.ceil(timeout_s))),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def train_distributed(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    scaling: Scaling = Scaling(),
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> RunResult:
    """`selfflow train --workers N`: the launcher's side (it holds the run folder's lock)."""
    uri = (tracking_uri or tracking_uri_for(runs_dir)) if tracking else None
    if uri:
        check_sqlite_store(uri)
    prepared = prepare(gin_files, gin_params, run_dir=run_dir, runs_dir=runs_dir, resume=resume, tracking_uri=uri)
    try:
        return _launch(prepared, scaling, gin_files, gin_params, runs_dir=runs_dir, resume=resume, tracking_uri=uri,
                       experiment_name=experiment_name, parent_run_id=parent_run_id, progress=progress)
    finally:
        run_folder.release(prepared.run_dir)


def _launch(prepared: PreparedRun, scaling: Scaling, gin_files: Sequence[str], gin_params: Sequence[str], *, runs_dir, resume: bool, tracking_uri: str | None,
            experiment_name: str | None, parent_run_id: str | None, progress: bool) -> RunResult:
    from selfflow.platform.scale import ray_cluster

    config_str, run_dir = prepared.config_str, prepared.run_dir
    import gin

    name = str(gin.query_parameter("build_experiment.name")) if _bound("build_experiment.name") else "experiment"
    host_preset = str(gin.query_parameter("TrainConfig.host")) if _bound("TrainConfig.host") else "stock"
    timeout_s = (float(gin.query_parameter("TrainConfig.process_group_timeout_s"))
                 if _bound("TrainConfig.process_group_timeout_s") else 1800.0)
    checkpoint_dir = run_dir / "checkpoints"
    source, state = ckpt.load_latest(checkpoint_dir) if resume else (None, None)
    if state is not None:
        check_worker_count(state, source, scaling.workers)

    cluster = ray_cluster.connect(worker_env=worker_environment(host_preset))
    ray_cluster.check_fits(cluster, scaling.workers, scaling.cpus_per_worker, scaling.gpus_per_worker,
                           "distributed training")
    uri, run_id, launcher_tracker, tags = tracking_uri, None, None, {}
    if uri:
        tags = launch_tags(gin_files, gin_params, extra=f"Data-parallel on {scaling.workers} Ray Train workers.")
        # The launcher opens the run (and resolves the experiment) once; workers only reopen it by id.
        launcher_tracker = MLflowTracker(
            tracking_uri=uri, experiment=experiment_name or "selfflow",
            run_id=(state or {}).get("mlflow_run_id") or None, run_name=unique_run_name(name),
            tags={"run_dir": str(run_dir), "workers": str(scaling.workers), **tags},
            parent_run_id=parent_run_id, runs_dir=runs_dir,
        )
        run_id = launcher_tracker.run_id
        if state is None:
            launcher_tracker.log_params(gin_config.flatten_config(config_str))
        launcher_tracker.log_params({"ray.workers": scaling.workers, "ray.cpus_per_worker": scaling.cpus_per_worker,
                                     "ray.gpus_per_worker": scaling.gpus_per_worker})
        launcher_tracker.flush(10.0)  # the launcher has no journal: deliver before the workers start
    spec = RunSpec(config_str=config_str, run_dir=str(run_dir), cwd=os.getcwd(), tracking_uri=uri,
                   experiment_name=experiment_name or "selfflow", mlflow_run_id=run_id, tags=tags,
                   threads=max(1, int(scaling.cpus_per_worker)), progress=progress,
                   resume_changes=prepared.resume_changes, stop_requests=True)
    trainer = make_torch_trainer(spec, scaling, run_dir / "ray", name=f"train-{run_dir.name}", timeout_s=timeout_s)
    started = time.perf_counter()
    clear_stop_request(run_dir)  # one left by a launcher killed before its workers stopped
    try:
        result = fit_interruptibly(trainer, on_first_signal=lambda signum: ask_workers_to_stop(run_dir, signum))
        stopped = stopped_by_request(run_dir)
        if stopped is not None:
            raise stopped
    except KeyboardInterrupt as interrupt:  # SIGINT / SIGTERM on the launcher
        raise stop_workers(interrupt, run_dir, run_id, uri, launcher_tracker) from None
    except Exception as error:
        if launcher_tracker is not None:
            launcher_tracker.client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"distributed training failed: {plain_error(_root_cause(error))}") from None
    finally:
        clear_stop_request(run_dir)
    metrics = dict(result.metrics or {})
    metrics["train/wall_s"] = time.perf_counter() - started
    return RunResult(run_dir=run_dir, mlflow_run_id=run_id, final_metrics=metrics,
                     checkpoint=ckpt.latest(checkpoint_dir), tracking_uri=uri)


def check_worker_count(state: dict[str, Any], source: Any, workers: int) -> None:
    """A checkpoint holds one generator state per worker: resuming with another count is refused
    before Ray starts or the MLflow run is touched."""
    saved = len(state.get("rank_generators") or []) or 1
    if saved != workers:
        raise UserError(f"checkpoint {source} was written by {saved} worker(s), this run asks for {workers}: "
                        f"resume with --workers {saved}")


def fit_interruptibly(trainer, on_first_signal: Callable[[int], None] | None = None):
    """trainer.fit() in a helper thread while the main thread waits, so SIGINT and SIGTERM reach this
    process's handlers (Ray replaces SIGINT's handler with its own, exiting 0, when fit runs in the
    main thread). With `on_first_signal`, the first signal calls it with the signal's number and the
    wait goes on (the workers stop themselves); a second signal, or any without it, is raised."""
    outcome: dict[str, Any] = {}
    # An Event, not Thread.join: a join interrupted by a signal can mark the thread stopped while it
    # still runs (CPython before 3.13), and the wait would end without an outcome.
    done = threading.Event()

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error
        finally:
            done.set()

    thread = threading.Thread(target=fit, name="selfflow-ray-fit", daemon=True)
    thread.start()
    signalled = False
    while not done.is_set():
        try:
            done.wait(0.2)
        except KeyboardInterrupt as interrupt:
            if signalled or on_first_signal is None:
                raise
            signalled = True
            on_first_signal(getattr(interrupt, "signum", signal.SIGINT))
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def ask_workers_to_stop(run_dir: Path, signum: int) -> None:
    """The first SIGINT/SIGTERM on a `--workers` launcher: a stop request in the run folder (the
    workers read it on log steps, checkpoint and stop together)."""
    request_stop(run_dir, signum)
    print(f"selfflow: {signal.Signals(signum).name}: the workers write a checkpoint and stop at their next log "
          f"step (signal again to stop at once)", file=sys.stderr, flush=True)


def stopped_by_request(run_dir: Path) -> RunInterrupted | None:
    """The RunInterrupted for a fit that ended on the launcher's stop request (rank 0 wrote the step
    into it), None for one that ran to its last step."""
    step = stopped_at_step(run_dir)
    if step is None:
        return None
    path = ckpt.step_path(run_dir / "checkpoints", step)
    return RunInterrupted(requested_stop(run_dir) or signal.SIGINT, step=step,
                          checkpoint=path if path.is_file() else None)


def stop_workers(interrupt: KeyboardInterrupt, run_dir: Path, run_id: str | None, uri: str | None,
                 launcher_tracker) -> RunInterrupted:
    """The run ends on a signal: stop Ray's workers (stopped on request, they wrote a checkpoint at
    their stop step; stopped by a second signal, they keep their last periodic one), mark the MLflow
    run KILLED, and return the RunInterrupted the CLI reports."""
    import ray

    from selfflow.platform.scale import ray_cluster

    ray_cluster.shutdown()
    if ray.is_initialized():
        ray.shutdown()  # a shared cluster: disconnecting ends this job's actors
    stopped = interrupt if isinstance(interrupt, RunInterrupted) else RunInterrupted(signal.SIGINT)
    stopped.newest_checkpoint = stopped.checkpoint or ckpt.latest(run_dir / "checkpoints")
    if launcher_tracker is not None and run_id:
        try:
            launcher_tracker.client.set_terminated(run_id, status="KILLED")
            stopped.mlflow_run_id, stopped.tracking_uri = run_id, uri
        except Exception as error:  # the store is gone: say so in the same line's place
            print(f"selfflow: warning: could not mark MLflow run {run_id} KILLED: {first_line(error)}",
                  file=sys.stderr, flush=True)
    return stopped


def worker_environment(host_preset: str = "stock") -> dict[str, str]:
    """What Ray's worker processes start with: the host preset's variables and --debug."""
    env = host.environment(host_preset)
    if debug_enabled():
        env[DEBUG_ENV] = "1"
    return env


def _bound(selector: str) -> bool:
    import gin

    try:
        gin.query_parameter(selector)
        return True
    except ValueError:
        return False


def _root_cause(error: BaseException) -> BaseException:
    """Ray wraps a worker's exception (TrainingFailedError -> worker errors): find the user's."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = getattr(error, "worker_failures", None) or getattr(error, "cause", None) or error.__cause__
        if isinstance(inner, dict) and inner:
            inner = next(iter(inner.values()))
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error
