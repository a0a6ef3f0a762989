"""Data-parallel training on Ray Train (TorchTrainer): `selfflow train ... --workers N`.

The driver parses the gin files once and ships `gin.config_str()` in a `WorkerJob`; every
worker clears gin, parses that string (plus the job's overrides), and builds the same
experiment. The driver also creates the MLflow run (so a restarted worker group keeps
writing into it); only rank 0 opens it, logs and saves checkpoints.

Every rank reads its own shard of the data (ShardData.loader(rank, world_size): the same
number of batches on every rank) and takes exactly TrainConfig.steps steps: gloo hangs when
ranks disagree on the step count. TrainConfig.batch_size is per worker (global batch =
batch_size * workers).

Random draws: rank r's objective generator is seeded `seed * 1000 + r` (Trainer). A
checkpoint therefore stores every rank's generator state (`rank_generators`), gathered
before rank 0 writes, so a restarted group continues every rank's stream exactly.

Fault tolerance: rank 0 reports each checkpoint to Ray Train (`ray.train.report`), Ray's
FailureConfig restarts a dead worker group, and the new group resumes from the newest
checkpoint (Ray's, else the run folder's) inside the same MLflow run.

This module imports Ray lazily: the registry imports it for `InjectedCrash` in every process.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gin
import torch
from torch import nn

from selfflow.components.core import module_device
from selfflow.components.files import write_text_atomic
from selfflow.platform import checkpoint as ckpt
from selfflow.platform import config as gin_config
from selfflow.platform.devices import parse_device, resolve_device
from selfflow.platform.errors import ConfigError, TrainingError, UserError
from selfflow.platform.experiment import Experiment, build_from_gin
from selfflow.platform.trainer import Trainer

ReportFn = Callable[[dict[str, float], "Path | None"], None]
"""(metrics, checkpoint file or None) -> None; called on every rank at the same steps."""


# ---- what crosses the process boundary ----------------------------------------------------------


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, as plain values (pickled by Ray)."""

    config_str: str
    run_dir: str
    cwd: str
    overrides: tuple[str, ...] = ()
    tracking_uri: str | None = None  # None: no tracking
    experiment_name: str = "selfflow"
    mlflow_run_id: str | None = None
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    progress: bool = False
    tags: dict[str, str] = field(default_factory=dict)


def plain_error(error: BaseException) -> Exception:
    """A picklable copy of `error` with a one-line message.

    gin re-raises errors from configurables as dynamically made proxy subclasses that do not
    pickle; Ray must pickle a worker's error to hand it to the driver.
    """
    message = " ".join(str(error).strip().splitlines()[0].split()) if str(error).strip() else type(error).__name__
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


# ---- gin and the experiment, rebuilt in a worker ------------------------------------------------


def configured_seed(default: int = 0) -> int:
    """TrainConfig.seed as bound in the current gin config (before anything is built)."""
    try:
        return int(gin.query_parameter("TrainConfig.seed"))
    except (ValueError, TypeError):
        return default


def build_seeded() -> Experiment:
    """Build from the parsed gin config with the global RNG seeded by TrainConfig.seed, so
    parameter initialisation is the same in every process and varies with the seed."""
    torch.manual_seed(configured_seed())
    return build_from_gin()


def rebuild_experiment(config_str: str, overrides: Sequence[str] = ()) -> Experiment:
    """Worker side of the gin round trip: parse the driver's string, build."""
    gin_config.parse_config_string(config_str, overrides)
    return build_seeded()


def rebuild_operative_config(config_str: str, overrides: Sequence[str] = ()) -> str:
    """Rebuild the experiment and return gin's operative config (what was actually used)."""
    try:
        rebuild_experiment(config_str, overrides)
        return gin.operative_config_str()
    except Exception as error:
        raise plain_error(error) from None


# ---- fault injection (tests, chaos drills) ------------------------------------------------------


@gin.configurable(module="selfflow")
class InjectedCrash:
    """Kill this worker once at `at_step` (0: never). `marker` (a file, default
    `<run_dir>/injected_crash.done`) records that it happened, so the restarted run goes on.
    `hard`: os._exit (a dying process) instead of raising. `rank`: which rank dies."""

    def __init__(self, at_step: int = 0, hard: bool = True, rank: int = 0, marker: str = ""):
        if at_step < 0:
            raise ConfigError(f"InjectedCrash.at_step must be >= 0, got {at_step}")
        self.at_step, self.hard, self.rank, self.marker = at_step, hard, rank, marker

    def on_step_end(self, trainer: Trainer, logs) -> None:
        if not self.at_step or trainer.step != self.at_step or trainer.rank != self.rank:
            return
        marker = Path(self.marker) if self.marker else trainer.run_dir / "injected_crash.done"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{trainer.run_dir.resolve()}\n")  # who crashed
        if self.hard:
            os._exit(17)
        raise RuntimeError(f"injected crash at step {trainer.step}")


def injected_crash_callbacks() -> list:
    """An InjectedCrash only when the config binds one (keeps it out of normal operative configs)."""
    try:
        gin.query_parameter("InjectedCrash.at_step")
    except ValueError:
        return []
    return [InjectedCrash()]


# ---- the trainer, rank-aware ---------------------------------------------------------------------


def _all_gather(value: Any, world_size: int) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


class DistributedTrainer(Trainer):
    """Trainer whose checkpoints carry every rank's generator state."""

    _gathered_generators: list[torch.Tensor] | None = None

    def save_checkpoint(self) -> Path | None:
        # Collective: every rank calls save_checkpoint (CheckpointEvery runs on all ranks).
        if self.world_size > 1:
            self._gathered_generators = _all_gather(self.generator.get_state(), self.world_size)
        return super().save_checkpoint()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rank_generators"] = list(self._gathered_generators or [self.generator.get_state()])
        return state

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "checkpoint") -> None:
        super().load_state_dict(state, source)
        generators = state.get("rank_generators") or []
        if len(generators) == self.world_size:
            self.generator.set_state(generators[self.rank])
        elif self.world_size > 1:
            raise UserError(
                f"checkpoint {source} holds generator states of {len(generators)} workers, "
                f"this run has {self.world_size}: resume with --workers {len(generators) or 1}"
            )

    def any_rank_non_finite(self, local: bool) -> bool:
        # Non-finite gradients need no vote: DDP's all-reduce already spreads them to every rank.
        if self.world_size == 1:
            return local
        import torch.distributed as dist

        flag = torch.tensor([1.0 if local else 0.0], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def replica_divergence(self) -> float:
        """Largest difference between ranks' parameter fingerprints (0.0: replicas identical)."""
        if self.world_size == 1:
            return 0.0
        fingerprint = parameter_fingerprint(self.module) + parameter_fingerprint(self.ema.model)
        everyone = _all_gather(fingerprint, self.world_size)
        return max(abs(a - b) for other in everyone[1:] for a, b in zip(everyone[0], other))


def parameter_fingerprint(module: nn.Module) -> list[float]:
    """Per tensor, a float64 position-weighted sum: equal parameters give equal numbers."""
    values = []
    for tensor in module.state_dict().values():
        flat = tensor.detach().cpu().double().flatten()
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).remainder_(7).add_(1)
        values.append(float((flat * weights).sum()))
    return values


class ReplicaCheck:
    """At the last step, every rank compares its parameters with rank 0's (a collective);
    logs dist/replica_divergence and stops loudly if the replicas drifted apart."""

    def on_step_end(self, trainer: "DistributedTrainer", logs) -> None:
        if trainer.world_size == 1 or trainer.step != trainer.config.steps:
            return
        divergence = trainer.replica_divergence()
        trainer.tracker.log_metrics({"dist/replica_divergence": divergence}, step=trainer.step)
        if divergence > 0.0:
            raise TrainingError(f"worker replicas diverged (parameter fingerprints differ by {divergence:.3g})")


class FrameworkReport:
    """Hands metrics (and the checkpoint just written) to Ray Train or Tune.

    Runs on every rank at the same steps (log steps, checkpoint steps, the last step):
    `ray.train.report` is a collective. Must come after CheckpointEvery in the callbacks.
    """

    def __init__(self, report: ReportFn, checkpoint_every: int, verbose: bool = False):
        self.report = report
        self.checkpoint_every = checkpoint_every
        self.verbose = verbose

    def on_step_end(self, trainer: Trainer, logs) -> None:
        config = trainer.config
        last = trainer.step == config.steps
        saved = last or (self.checkpoint_every and trainer.step % self.checkpoint_every == 0)
        if not (saved or trainer.step % config.log_every == 0):
            return
        metrics = {key: value for key, (_, value) in trainer.tracker.latest.items()}
        metrics["step"] = float(trainer.step)
        if self.verbose and trainer.rank == 0:
            shown = " ".join(f"{k}={metrics[k]:.4g}" for k in ("loss/total", "train/samples_per_s") if k in metrics)
            print(f"selfflow: step {trainer.step}/{config.steps} {shown}", flush=True)
        path = ckpt.step_path(trainer.checkpoint_dir, trainer.step) if saved and trainer.rank == 0 else None
        self.report(metrics, path if path is not None and path.is_file() else None)


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


# ---- one worker ---------------------------------------------------------------------------------


def run_worker(
    job: WorkerJob,
    rank: int = 0,
    world_size: int = 1,
    report: ReportFn | None = None,
    framework_checkpoint=None,
    wrap_module: Callable[[nn.Module], nn.Module] | None = None,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Train this worker's part: the code path shared by Ray Train workers and Tune trials.
    `device`: Ray Train's choice for this worker; None for a Tune trial (see worker_device)."""
    from selfflow.platform.run import standard_callbacks
    from selfflow.platform.tracking import MLflowTracker, NullTracker

    if os.path.isdir(job.cwd):
        os.chdir(job.cwd)  # relative paths in gin files (data/, runs/) mean the driver's folder
    experiment = rebuild_experiment(job.config_str, job.overrides)
    config = experiment.train
    device = device if device is not None else worker_device(job.use_gpu, config.device)
    if not config.num_threads:
        torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    source, state = newest_state(framework_checkpoint, run_dir / "checkpoints")

    tracker = NullTracker()
    if rank == 0 and job.tracking_uri:
        run_id = job.mlflow_run_id or (state or {}).get("mlflow_run_id") or None
        tracker = MLflowTracker(tracking_uri=job.tracking_uri, experiment=job.experiment_name, run_id=run_id,
                                run_name=experiment.name, journal_dir=run_dir)
        tracker.set_tags(dict(experiment.tags, **job.tags))
    callbacks = standard_callbacks(experiment) + [ReplicaCheck()]
    if report is not None:
        callbacks.append(FrameworkReport(report, config.checkpoint_every, verbose=job.progress))
    callbacks += injected_crash_callbacks()
    data = experiment.data.loader(batch_size=config.batch_size, seed=config.seed, rank=rank, world_size=world_size)
    status = "FAILED"
    try:
        trainer = DistributedTrainer(experiment, data, run_dir, tracker=tracker, callbacks=callbacks, rank=rank,
                                     world_size=world_size, wrap_module=wrap_module, progress=False, device=device)
        trainer.mlflow_run_id = tracker.run_id
        if state is not None:
            trainer.load_state_dict(state, source=source)
            trainer.mlflow_run_id = tracker.run_id
            tracker.set_tags({"resumed_at_step": str(trainer.step)})
            print(f"selfflow: rank {rank} resumed from {source} at step {trainer.step}", flush=True)
        final = trainer.fit()
        status = "FINISHED"
        return final
    finally:
        tracker.finish(status)


def worker_device(use_gpu: bool, configured: str) -> torch.device:
    """A Ray worker's device: Ray reserves GPUs (--gpus-per-worker) and makes only the reserved ones
    visible, so a worker with one trains on CUDA and a worker without one on the CPU."""
    if use_gpu:
        return resolve_device("cuda")
    named = parse_device(configured)
    if named is not None and named.type != "cpu":
        raise ConfigError(f"TrainConfig.device is {configured!r} but the Ray workers reserve no GPU: "
                          f"pass --gpus-per-worker, or use 'auto' or 'cpu'")
    return torch.device("cpu")


def ddp_wrapper() -> Callable[[nn.Module], nn.Module]:
    def wrap(module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # A mixture's step trains one modality: the other modalities' input and output layers get no
        # gradient that step, which DDP must be told to expect.
        options = {"find_unused_parameters": bool(getattr(module.model, "modalities", ()))}
        device = module_device(module)  # the Trainer has placed the module already
        if device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[device], **options)
        return DistributedDataParallel(module, **options)

    return wrap


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    import ray.train

    job: WorkerJob = loop_config["job"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    try:
        if job.use_gpu:
            import ray.train.torch

            device = ray.train.torch.get_device()  # this worker's GPU among those visible on its node
        else:
            device = None
        run_worker(
            job, rank, world_size,
            report=report_with_checkpoint(ray.train.report, ray.train.Checkpoint),
            framework_checkpoint=ray.train.get_checkpoint(),
            wrap_module=ddp_wrapper() if world_size > 1 else None,
            device=device,
        )
    except Exception as error:
        raise plain_error(error) from None


# ---- the driver ---------------------------------------------------------------------------------


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


def make_torch_trainer(job: WorkerJob, scaling: Scaling, storage_path: str | Path, name: str, callbacks=()):
    """A TorchTrainer that runs `train_loop_per_worker` (gloo on CPU, NCCL on GPU)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = scaling.gpus_per_worker > 0
    resources = {"CPU": scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def experiment_name_in_config() -> str:
    try:
        return str(gin.query_parameter("build_experiment.name"))
    except ValueError:
        return "experiment"


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
):
    """`selfflow train --workers N`: the driver side. Returns a run.RunResult."""
    from selfflow.platform import ray_cluster
    from selfflow.platform.run import RunResult, default_run_dir
    from selfflow.platform.tracking import MLflowTracker, default_tracking_uri, git_commit

    config_str = gin_config.parse(gin_files, gin_params)
    name = experiment_name_in_config()
    run_dir = Path(run_dir) if run_dir else default_run_dir(runs_dir, name)
    run_dir = run_dir.resolve()
    checkpoint_dir = run_dir / "checkpoints"
    _, state = ckpt.load_latest(checkpoint_dir) if resume else (None, None)
    if resume and state is None:
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir}")
    if not resume and ckpt.latest(checkpoint_dir) is not None:
        raise UserError(f"run folder {run_dir} already has checkpoints: pass --resume or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.gin", config_str)

    cluster = ray_cluster.connect()
    ray_cluster.check_fits(cluster, scaling.workers, scaling.cpus_per_worker, scaling.gpus_per_worker,
                           "distributed training")
    uri, run_id, driver_tracker = None, None, None
    if tracking:
        uri = tracking_uri or default_tracking_uri(runs_dir)
        # The driver opens the run (and resolves the experiment) once; workers only reopen it by id.
        driver_tracker = MLflowTracker(
            tracking_uri=uri, experiment=experiment_name or "selfflow",
            run_id=(state or {}).get("mlflow_run_id") or None, run_name=name,
            tags={"git_commit": git_commit(), "run_dir": str(run_dir), "workers": str(scaling.workers)},
            parent_run_id=parent_run_id, runs_dir=runs_dir,
        )
        run_id = driver_tracker.run_id
        if state is None:
            driver_tracker.log_params(gin_config.flatten_config(config_str))
        driver_tracker.log_params({"ray.workers": scaling.workers, "ray.cpus_per_worker": scaling.cpus_per_worker,
                                   "ray.gpus_per_worker": scaling.gpus_per_worker})
    job = WorkerJob(
        config_str=config_str, run_dir=str(run_dir), cwd=os.getcwd(), tracking_uri=uri,
        experiment_name=experiment_name or "selfflow", mlflow_run_id=run_id,
        cpus_per_worker=scaling.cpus_per_worker, use_gpu=scaling.gpus_per_worker > 0, progress=progress,
    )
    trainer = make_torch_trainer(job, scaling, run_dir / "ray", name=f"train-{run_dir.name}")
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as error:
        if driver_tracker is not None:
            driver_tracker.client.set_terminated(run_id, status="FAILED")
        raise TrainingError(f"distributed training failed: {plain_error(_root_cause(error))}") from None
    metrics = dict(result.metrics or {})
    metrics["train/wall_s"] = time.perf_counter() - started
    return RunResult(
        run_dir=run_dir, mlflow_run_id=run_id, final_metrics=metrics,
        checkpoint=ckpt.latest(checkpoint_dir), tracking_uri=uri,
    )


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
