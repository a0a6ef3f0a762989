"""The one training driver: config -> experiment -> data -> trainer (+ callbacks) -> tracker.

`run_training` trains one run from a `RunSpec` (plain values). It is the code path of every
training there is: `selfflow train` in one process (through `train`), each Ray Train worker
(platform/scale/ray_train.py) and each Tune trial (platform/scale/sweep.py). Whatever differs
between them comes in as arguments: the rank and world size, a checkpoint to resume from, extra
callbacks (reports to Ray), a module wrapper (DDP) and the device Ray picked.

The gin config travels as a string: the launcher parses the files once (`prepare_run`), and
`run_training` rebuilds gin's state from that string in whatever process it runs in.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gin
import torch
from torch import nn

from selfflow.platform import host
from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.devices import resolve_device
from selfflow.platform.config.experiment import Experiment, build_from_gin, train_config_from_gin
from selfflow.platform.errors import CheckpointError, TrainingError, UserError, first_line, write_traceback
from selfflow.platform.tracking.base import NullTracker
from selfflow.platform.tracking import provenance
from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, check_sqlite_store, tracking_uri_for
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train import run_folder
from selfflow.platform.train.background_eval import BackgroundEvaluation
from selfflow.platform.train.callbacks import CheckpointEvery, LogOperativeConfig, SampleGrid, evaluation_callbacks
from selfflow.platform.train.interrupts import RunInterrupted, StopOnSignal, stop_at_step_end
from selfflow.platform.train.parallel import ReplicaCheck
from selfflow.platform.train.run_tracking import record_start, run_tracking, tracking_callbacks
from selfflow.platform.train.trainer import MetricMemory, Trainer


@dataclass(frozen=True)
class RunSpec:
    """Everything a training run needs, as plain values (pickled to Ray workers and Tune trials).

    config_str: gin's config after the launcher parsed files + bindings; overrides: bindings applied
    on top in the training process (a sweep trial's sampled values). mlflow_run_id: the run the
    launcher opened (None: `run_training` opens one when tracking_uri is set). tags: the run's MLflow
    tags from the launcher (its provenance: platform/tracking/provenance.py). threads: torch
    intra-op threads when TrainConfig.num_threads is 0 (0: torch's default). stop_requests: the
    workers of a `--workers` run, whose launcher takes SIGINT/SIGTERM, read its stop request from the
    run folder (platform/train/interrupts.py).
    """

    config_str: str
    run_dir: str
    cwd: str = ""
    overrides: tuple[str, ...] = ()
    tracking_uri: str | None = None  # None: no tracking
    experiment_name: str = "selfflow"
    mlflow_run_id: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    threads: int = 0
    progress: bool = False
    resume_changes: str = ""  # what this resume changed in the run's config (run_folder.RESUMABLE)
    stop_requests: bool = False


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str | None
    final_metrics: dict[str, float]
    checkpoint: Path | None
    tracking_uri: str | None


def default_run_dir(runs_dir: str | Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path(runs_dir) / safe


def experiment_name_in_config() -> str:
    try:
        return str(gin.query_parameter("build_experiment.name"))
    except ValueError:
        return "experiment"


def standard_callbacks(experiment: Experiment, extra: Sequence[Any] = (), world_size: int = 1,
                       stop_requests: Path | None = None) -> list:
    """The callbacks every training run uses, in order: the replica check, then the checkpoint
    (the trained state is on disk before anything optional runs), then the optional ones (operative
    config, sample grid, evaluation, `extra` such as system metrics), then checkpoint retention (it
    may rank by a metric evaluation just logged). Callbacks added after these (reports to Ray) may
    rely on this step's checkpoint. StopOnSignal comes first and last: a SIGINT/SIGTERM ends the run
    at the end of its step (with `stop_requests`, a run folder: the last one reads the launcher's
    stop request there, on log steps). TrainConfig.eval_mode 'background' (or 'auto' with more than one worker)
    moves the sample grid and evaluation to a separate process."""
    config = experiment.train
    checkpoints = CheckpointEvery(config.checkpoint_every, defer_retention=True)
    evaluations: list = [SampleGrid(config.eval_every), *evaluation_callbacks(experiment.evaluation)]
    if config.eval_mode == "background" or (config.eval_mode == "auto" and world_size > 1):
        evaluations = [BackgroundEvaluation(config.eval_every, evaluations[1:], gin.config_str())]
    return [
        StopOnSignal(),
        ReplicaCheck(),
        checkpoints,
        LogOperativeConfig(),
        *evaluations,
        *extra,
        checkpoints.retention,
        StopOnSignal(stop_requests),
    ]


def check_data_splits(experiment: Experiment) -> None:
    """Every split the run will read, checked before training (index, shard files, classes): a
    missing test split fails now, not after the last step."""
    for _, view in experiment.views():
        check = getattr(view.data, "check_split", None)
        if check is None:
            continue
        splits = [getattr(view.data, "train_split", "train")]
        if view.evaluation is not None:  # evaluation reads both splits (platform/evaluate/eval_data.py)
            splits.append(getattr(view.data, "eval_split", "test"))
        for split in dict.fromkeys(splits):
            check(split)


def check_checkpoint_state(state: Any, source: Any) -> None:
    """The parts of a checkpoint a resume reads, with their types: CheckpointError naming the file
    and the part, instead of an error from deep inside loading."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {source} is not a training checkpoint (holds {type(state).__name__})")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {source}: 'step' must be an int >= 0, got {step!r:.60}")
    for key in ("model", "objective", "ema", "optimizer", "lr_schedule", "running"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"checkpoint {source} lacks its '{key}' state: not a resumable training checkpoint")
    if not isinstance(state["ema"].get("model"), dict) or isinstance(state["ema"].get("updates"), bool) \
            or not isinstance(state["ema"].get("updates"), int):
        raise CheckpointError(f"checkpoint {source}: damaged 'ema' state (model weights and an int update count)")
    if not isinstance(state.get("generator"), torch.Tensor):
        raise CheckpointError(f"checkpoint {source} lacks its generator state: not a resumable training checkpoint")


def restore(trainer: Trainer, state: dict[str, Any], source: Any) -> None:
    """Load a checkpoint into the trainer; whatever does not fit becomes one CheckpointError."""
    check_checkpoint_state(state, source)
    try:
        trainer.load_state_dict(state, source=source)
    except (UserError, TrainingError):
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
        missing = f"lacks {error}" if isinstance(error, KeyError) else first_line(error, 200)
        raise CheckpointError(f"checkpoint {source} cannot be resumed: {missing}") from None


def rebuild_experiment(config_str: str, overrides: Sequence[str] = ()) -> Experiment:
    """gin's state from the launcher's string (plus overrides), then the experiment."""
    gin_config.parse_config_string(config_str, overrides)
    return build_from_gin()


def clean_interrupted_writes(run_dir: Path) -> None:
    """Remove what a killed process left half-written: temp files and a sample grid being saved."""
    for folder, pattern in ((run_dir / "checkpoints", ".*.tmp"), (run_dir, ".*.tmp"), (run_dir / "samples", ".*.png")):
        ckpt.clean_temp_files(folder, pattern)


def keep_traceback(error: BaseException, folder: Path) -> None:
    """An error the platform did not diagnose keeps its full traceback in <folder>/error.log; the
    CLI names the file (platform/errors.py)."""
    if isinstance(error, (UserError, TrainingError)) or getattr(error, "traceback_file", None):
        return
    path = write_traceback(error, folder)
    try:
        error.traceback_file = path
    except AttributeError:  # an exception type with __slots__
        pass


@dataclass(frozen=True)
class PreparedRun:
    config_str: str
    run_dir: Path
    resume_changes: str = ""  # what a resume changed (run_folder.RESUMABLE settings), described


def prepare_run(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    tracking_uri: str | None = None,
) -> tuple[str, Path]:
    """The launcher's side: parse the files once, check the values, lock and check the run folder,
    record what the run trains with (config.gin; a resume's changes in resumes.jsonl). Nothing is
    written before every check passed; the folder stays locked by this process until
    `run_folder.release` (train() and train_distributed() release it when the run ends).
    Returns (gin config string, absolute run folder)."""
    prepared = prepare(gin_files, gin_params, run_dir=run_dir, runs_dir=runs_dir, resume=resume,
                       tracking_uri=tracking_uri)
    return prepared.config_str, prepared.run_dir


def prepare(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    tracking_uri: str | None = None,
) -> PreparedRun:
    """prepare_run, also returning what a resume changed."""
    config_str = gin_config.parse(gin_files, gin_params)
    train_config = train_config_from_gin()
    run_dir = Path(run_dir) if run_dir else default_run_dir(runs_dir, experiment_name_in_config())
    run_dir = Path(os.path.abspath(run_dir)).resolve()
    run_folder.lock(run_dir)
    try:
        found = ckpt.list_checkpoints(run_dir / "checkpoints")
        if resume and not found:
            raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        if not resume and found:
            raise UserError(f"run folder {run_dir} already has checkpoints: pass --resume or another --run-dir")
        changes: dict[str, tuple[str, str]] = {}
        if resume:
            recorded = run_folder.recorded_tracking_uri(run_dir)
            if tracking_uri and recorded and recorded != tracking_uri:
                raise UserError(f"--resume: this run logs to {recorded} (its tracking journal says so), not to "
                                f"{tracking_uri}: resume with that store (--runs / MLFLOW_TRACKING_URI) or "
                                f"--no-tracking")
            changes = run_folder.check_resume(run_dir, config_str, found[-1][0], train_config.steps)
            run_folder.record_config(run_dir, config_str, resumed_at=found[-1][0], changes=changes)
        else:
            run_folder.record_config(run_dir, config_str)
    except OSError as error:
        run_folder.release(run_dir)
        converted = run_folder.file_system_error(error, run_dir)
        if converted is None:
            raise
        raise converted from None
    except BaseException:
        run_folder.release(run_dir)
        raise
    return PreparedRun(config_str, run_dir, run_folder.describe_changes(changes))


def run_training(
    spec: RunSpec,
    *,
    rank: int = 0,
    world_size: int = 1,
    restored: tuple[Path | None, dict[str, Any] | None] | None = None,
    extra_callbacks: Sequence[Any] = (),
    wrap_module: Callable[[nn.Module], nn.Module] | None = None,
    choose_device: Callable[[str], torch.device] = resolve_device,
) -> RunResult:
    """Train this process's part of the run in `spec` (the whole run with world_size 1).

    restored: (source, state) of the checkpoint to continue from; None: the run folder's newest,
    if any (a fresh run's folder has none: `prepare_run` checked). device: None means
    TrainConfig.device decides.

    Order: build, check every data split, load the checkpoint, and only then open the MLflow run,
    so that a run refused at start leaves its MLflow run as it was. A failure to write the run
    folder (read-only, full) becomes one UserError line naming the file.
    """
    try:
        return _run_training(spec, rank=rank, world_size=world_size, restored=restored,
                             extra_callbacks=extra_callbacks, wrap_module=wrap_module, choose_device=choose_device)
    except OSError as error:
        converted = run_folder.file_system_error(error, spec.run_dir)
        if converted is None:
            raise
        raise converted from None


def open_tracker(spec: RunSpec, experiment: Experiment, run_dir: Path, state: dict[str, Any] | None):
    """The run's MLflow tracker (rank 0 with a tracking URI), else a NullTracker."""
    if not spec.tracking_uri:
        return NullTracker()
    run_id = spec.mlflow_run_id or (state or {}).get("mlflow_run_id") or None
    tracker = MLflowTracker(tracking_uri=spec.tracking_uri, experiment=spec.experiment_name, run_id=run_id,
                            run_name=provenance.unique_run_name(experiment.name), parent_run_id=spec.parent_run_id,
                            journal_dir=run_dir, tags=dict(experiment.tags, **spec.tags))
    record_start(tracker, experiment, run_dir.resolve(), spec.tags)
    return tracker


def _run_training(spec: RunSpec, *, rank: int, world_size: int, restored, extra_callbacks, wrap_module,
                  choose_device) -> RunResult:
    if spec.cwd and os.path.isdir(spec.cwd):
        os.chdir(spec.cwd)  # relative paths in gin files (data/, runs/) mean the launcher's folder
    experiment = rebuild_experiment(spec.config_str, spec.overrides)
    config = experiment.train
    for warning in host.apply_in_process(config.host):
        print(f"selfflow: warning: {warning}", file=sys.stderr, flush=True)
    if spec.threads and not config.num_threads:
        torch.set_num_threads(spec.threads)
    check_data_splits(experiment)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_interrupted_writes(run_dir)
    source, state = restored if restored is not None else ckpt.load_latest(run_dir / "checkpoints")

    options = run_tracking()  # on every rank: gin's operative config then lists RunTracking everywhere
    tracked = tracking_callbacks(options) if rank == 0 else []
    stop_requests = run_dir if spec.stop_requests else None
    callbacks = [*standard_callbacks(experiment, tracked, world_size, stop_requests), *extra_callbacks,
                 *experiment.callbacks]
    layout = config.layout(world_size)  # the global batch over the workers: a one-line error if it does not divide
    data = experiment.data.loader(batch_size=layout.micro_batch, seed=config.seed, rank=rank, world_size=world_size)
    trainer = Trainer(experiment, data, run_dir, callbacks=callbacks, rank=rank, world_size=world_size,
                      wrap_module=wrap_module, progress=spec.progress and rank == 0,
                      device=choose_device(config.device))
    if state is not None:
        restore(trainer, state, source)
    tracker = open_tracker(spec, experiment, run_dir, state) if rank == 0 else NullTracker()
    status = "FAILED"  # whatever fails from here on ends the MLflow run as FAILED
    try:
        trainer.tracker = MetricMemory(tracker)
        trainer.mlflow_run_id = tracker.run_id
        if state is not None:
            tags = {"resumed_at_step": str(trainer.step)}
            if spec.resume_changes:
                tags[f"resume.step_{trainer.step}.changes"] = spec.resume_changes
            tracker.set_tags(tags)
            if not spec.progress:
                print(f"selfflow: rank {rank} resumed from {source} at step {trainer.step}", flush=True)
        with stop_at_step_end():
            final = trainer.fit()
        # The newest value of every metric logged (evaluation's too), the last training log's winning.
        final = {**{key: value for key, (_, value) in trainer.tracker.latest.items()}, **final}
        status = "FINISHED"
    except KeyboardInterrupt as interrupt:  # SIGINT / SIGTERM (platform/train/interrupts.py)
        status = "KILLED"
        if isinstance(interrupt, RunInterrupted):
            interrupt.step = trainer.step if interrupt.step is None else interrupt.step
            interrupt.newest_checkpoint = interrupt.checkpoint or ckpt.latest(run_dir / "checkpoints")
            interrupt.mlflow_run_id, interrupt.tracking_uri = tracker.run_id, spec.tracking_uri
        raise
    except Exception as error:
        if isinstance(error, OSError) and run_folder.file_system_error(error, run_dir) is not None:
            raise  # run_training turns it into one line
        keep_traceback(error, run_dir if rank == 0 else run_dir / f"rank{rank}")
        raise
    finally:
        for callback in tracked:
            callback.close()
        tracker.finish(status)
    return RunResult(run_dir=run_dir, mlflow_run_id=tracker.run_id, final_metrics=final,
                     checkpoint=ckpt.latest(run_dir / "checkpoints"), tracking_uri=spec.tracking_uri)


def train(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> RunResult:
    """`selfflow train`: one run in this process (its folder locked until it ends)."""
    uri = (tracking_uri or tracking_uri_for(runs_dir)) if tracking else None
    if uri:
        check_sqlite_store(uri)  # an SQLite store that cannot be opened fails before anything is written
    prepared = prepare(gin_files, gin_params, run_dir=run_dir, runs_dir=runs_dir, resume=resume, tracking_uri=uri)
    try:
        spec = RunSpec(
            config_str=prepared.config_str, run_dir=str(prepared.run_dir), cwd=os.getcwd(), tracking_uri=uri,
            experiment_name=experiment_name or "selfflow", parent_run_id=parent_run_id, progress=progress,
            resume_changes=prepared.resume_changes, tags=launch_tags(gin_files, gin_params) if uri else {},
        )
        return run_training(spec)
    finally:
        run_folder.release(prepared.run_dir)


def launch_tags(gin_files: Sequence[str], gin_params: Sequence[str], extra: str = "") -> dict[str, str]:
    """The provenance tags of a run this process launches, its description taken from the header
    comment of the experiment's gin file (the first file that has one)."""
    resolved = []
    for name in gin_files:
        try:
            resolved.append(gin_config.resolve_config_file(name))
        except UserError:  # parse() already checked the files; a vanished one just has no header
            continue
    header = provenance.first_header(resolved)
    return provenance.source_tags(gin_files, gin_params, provenance.describe(header, gin_files, gin_params, extra))
