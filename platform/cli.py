"""`selfflow` command line: train, sweep, study, compare, ui, data, sample, eval, demo.

torch is imported only inside the commands, after the host preset (platform/host.py) is applied:
OpenMP reads its wait policy once, when torch loads it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Sequence

from selfflow.platform import host
from selfflow.platform.data import DataError
from selfflow.platform.errors import DEBUG_ENV, TrainingError, UserError, debug_enabled, one_line, write_traceback


def _add_gin_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", "--gin-file", action="append", default=[], metavar="FILE",
                        help="gin file (repeatable); resolved against . and experiments/")
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[], metavar="BINDING",
                        help="gin binding applied after the files (repeatable), e.g. TrainConfig.steps=100")


def _cmd_train(args: argparse.Namespace) -> int:
    from selfflow.platform.train.driver import train

    if not args.gin_file:
        raise UserError("train needs at least one --gin_file (e.g. --gin_file digits/fm.gin)")
    if args.workers is not None or args.gpus_per_worker:
        return _cmd_train_distributed(args)
    result = train(
        args.gin_file, args.gin_param, run_dir=args.run_dir, runs_dir=args.runs, resume=args.resume,
        tracking=not args.no_tracking, progress=not args.quiet,
    )
    _print_result(result)
    return 0


def _cmd_train_distributed(args: argparse.Namespace) -> int:
    from selfflow.platform.scale import ray_cluster
    from selfflow.platform.scale.ray_train import Scaling, train_distributed

    scaling = Scaling(workers=1 if args.workers is None else args.workers, cpus_per_worker=args.cpus_per_worker,
                      gpus_per_worker=args.gpus_per_worker, max_failures=args.max_failures)
    try:
        result = train_distributed(
            args.gin_file, args.gin_param, scaling=scaling, run_dir=args.run_dir, runs_dir=args.runs,
            resume=args.resume, tracking=not args.no_tracking, progress=not args.quiet,
        )
    finally:
        ray_cluster.shutdown()
    _print_result(result)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from selfflow.platform.scale import ray_cluster
    from selfflow.platform.scale.sweep import print_summary, run_sweep

    try:
        result = run_sweep(args.sweep_file, args.gin_param, runs_dir=args.runs, sweep_dir=args.sweep_dir,
                           tracking=not args.no_tracking, compare=not args.no_compare)
    finally:
        ray_cluster.shutdown()
    print_summary(result)
    if result.parent_run_id:
        print(f"mlflow parent run: {result.parent_run_id}  ({result.tracking_uri})")
    print(f"sweep wall time:   {result.wall_s:.0f} s")
    if result.interrupted:
        print(f"selfflow: sweep interrupted by {signal.Signals(result.interrupted).name}: unfinished trials are "
              f"marked KILLED and keep their newest checkpoints", file=sys.stderr, flush=True)
        return 128 + result.interrupted
    return 1 if result.failed else 0


def _cmd_study(args: argparse.Namespace) -> int:
    from selfflow.platform.scale import ray_cluster
    from selfflow.platform.scale.study import describe, open_store, plan_study, run_study

    study = plan_study(args.study_file, args.gin_param, quick=args.quick, runs_dir=args.runs)
    if args.plan:
        print("\n".join(describe(study, open_store(study, args.tracking_uri))))
        return 0
    try:
        result = run_study(study, sections=args.section, tracking_uri=args.tracking_uri, out=args.out,
                           plots_dir=args.plots_dir, report_only=args.report_only)
    finally:
        ray_cluster.shutdown()
    if result.interrupted:
        sweep, signum = result.interrupted
        print(f"selfflow: study interrupted by {signal.Signals(signum).name} in sweep {sweep}: finished trials are "
              f"in MLflow and are not rerun; run the same command to continue (--report-only writes the report "
              f"from what is finished)", file=sys.stderr, flush=True)
        return 128 + signum
    report = result.report
    print(f"report:          {report.path}  ({report.finished} of {report.planned} trials finished, "
          f"{len(report.plots)} plots)")
    for claim in report.claims:
        print(f"  claim {claim.spec.id:<6} {claim.verdict:<14} {claim.spec.statement}")
    for line in result.failed:
        print(f"selfflow study: failed for good: {line}", file=sys.stderr)
    print(f"study wall time: {result.wall_s:.0f} s")
    return 1 if result.failed else 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from selfflow.platform.tracking.compare import compare_runs

    if not (args.experiment or args.parent or args.filter):
        raise UserError("compare needs --experiment, --parent or --filter")
    comparison = compare_runs(
        experiment=args.experiment, parent_run_id=args.parent, filter_string=args.filter,
        metrics=args.metric or None, out_dir=args.out, log_to_run=args.parent if not args.no_log else None,
        log_new_run=not args.no_log and not args.parent, runs_dir=args.runs,
    )
    print(f"written: {', '.join(str(p) for p in comparison.files[:2])} and {len(comparison.files) - 2} plots")
    return 0


def _print_result(result) -> None:
    print(f"run folder:      {result.run_dir}")
    print(f"checkpoint:      {result.checkpoint}")
    if result.mlflow_run_id:
        print(f"mlflow run:      {result.mlflow_run_id}  ({result.tracking_uri})")
    for key in sorted(result.final_metrics):
        if key.startswith(("loss/", "train/samples_per_s")):
            print(f"  {key:<22} {result.final_metrics[key]:.4f}")


def _cmd_data(args: argparse.Namespace) -> int:
    from selfflow.platform.data.shards import (
        build_digits_shards,
        build_moving_digits_shards,
        build_spoken_digits_shards,
    )

    if args.dataset == "images":
        return _cmd_data_images(args)
    if args.dataset == "encode":
        return _cmd_data_encode(args)
    builders = {"digits": build_digits_shards, "moving_digits": build_moving_digits_shards,
                "spoken_digits": build_spoken_digits_shards}
    if args.dataset not in builders:
        raise UserError(f"unknown dataset {args.dataset!r}; available: {', '.join(builders)}, images")
    out = Path(args.out or f"data/{args.dataset}")
    options = {}
    if args.dataset == "spoken_digits":
        options = {"sample_rate": args.sample_rate, "duration": args.duration}
    elif args.sample_rate is not None or args.duration is not None:
        raise UserError(f"--sample-rate and --duration are options of spoken_digits, not {args.dataset}")
    try:
        written = builders[args.dataset](out, seed=args.seed, **{k: v for k, v in options.items() if v is not None})
    except (ValueError, FileNotFoundError) as error:
        raise UserError(f"data {args.dataset}: {error}") from None
    for split, summary in written.items():
        print(f"{split:<6} {summary.total:>5} samples in {len(summary.shard_paths)} shards -> {summary.index_path}")
    return 0


def _cmd_data_images(args: argparse.Namespace) -> int:
    from selfflow.platform.data.shards import summarize_shards
    from selfflow.platform.jobs.encode_images import encode_folder_from_gin

    if not args.folder or not args.tokenizer_gin or not args.out:
        raise UserError("data images needs --folder DIR --tokenizer-gin FILE --out DIR "
                        "(e.g. --tokenizer-gin tokenizers/sd_vae_ema.gin)")

    def progress(done: int, total: int) -> None:
        print(f"\r{args.split}: {done}/{total} images encoded", end="", flush=True)

    index = encode_folder_from_gin(
        args.folder, args.tokenizer_gin, args.out, args.gin_param, split=args.split, image_size=args.image_size,
        shard_size=args.shard_size, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
        num_workers=args.num_workers, progress=None if args.quiet else progress,
    )
    if not args.quiet:
        print()  # end the progress line
    summary = summarize_shards(index)
    print(f"{summary.split:<6} {summary.total:>5} samples in {len(summary.shard_paths)} shards -> {summary.index_path}")
    return 0


def _cmd_data_encode(args: argparse.Namespace) -> int:
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.loaders import autoencoder
    from selfflow.platform.data.latent_shards import encode_shard_set
    from selfflow.platform.data.shards import summarize_shards

    if not args.source or not args.tokenizer_gin or not args.out:
        raise UserError("data encode needs --source DIR --tokenizer-gin FILE --out DIR "
                        "(e.g. --tokenizer-gin tokenizers/encodec_24khz.gin)")
    config.parse([args.tokenizer_gin], args.gin_param)
    try:
        tokenizer = autoencoder()
    except (TypeError, ValueError, RuntimeError, OSError) as error:
        raise UserError(str(error).strip().splitlines()[0]) from None

    def progress(split: str, done: int, total: int) -> None:
        print(f"\r{split}: {done}/{total} encoded", end="" if done < total else "\n", flush=True)

    try:
        written = encode_shard_set(args.source, tokenizer, args.out, batch_size=args.batch_size,
                                   progress=None if args.quiet else progress)
    except (DataError, TypeError, ValueError, OSError, RuntimeError) as error:
        raise UserError(f"data encode: {str(error).strip().splitlines()[0]}") from None
    for split, index in written.items():
        summary = summarize_shards(index)
        print(f"{split:<6} {summary.total:>5} samples in {len(summary.shard_paths)} shards -> {index}")
    return 0


def _cmd_autoencoder(args: argparse.Namespace) -> int:
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.jobs.autoencoders import AutoencoderTraining

    if not args.gin_file:
        raise UserError("autoencoder needs --gin_file (e.g. --gin_file tokenizers/conv_ae_digits_train.gin)")
    config.parse(args.gin_file, args.gin_param)
    try:
        job = AutoencoderTraining()
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(str(error).strip().splitlines()[0]) from None
    metrics = job.run()
    print(f"autoencoder:     {job.out}  ({int(metrics['parameters'])} parameters, latents {job.latent_shape})")
    for key in ("train_mse", "test_mse", "final_loss"):
        if key in metrics:
            print(f"  {key:<16} {metrics[key]:.5f}")
    return 0


def _cmd_encoder(args: argparse.Namespace) -> int:
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.jobs.encoders import EncoderTraining

    if not args.gin_file:
        raise UserError("encoder needs --gin_file (e.g. --gin_file encoders/digits_small.gin)")
    config.parse(args.gin_file, args.gin_param)
    try:
        job = EncoderTraining()
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(str(error).strip().splitlines()[0]) from None
    metrics = job.run()
    print(f"encoder:         {job.out}  ({int(metrics['parameters'])} parameters, size {job.size})")
    for key in ("train_accuracy", "test_accuracy", "final_loss"):
        if key in metrics:
            print(f"  {key:<16} {metrics[key]:.4f}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from selfflow.platform.train.callbacks import write_sample_grid
    from selfflow.platform.train.saved import load_for_sampling

    experiment, model, step = load_for_sampling(args.run_dir, args.checkpoint, args.gin_param)
    out_dir = Path(args.out) if args.out else Path(args.run_dir) / "samples"
    for path in write_sample_grid(experiment, model, out_dir, step):
        print(f"samples: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from selfflow.platform.data.shards import build_digits_shards, index_path_for
    from selfflow.platform.train.driver import train

    started = time.perf_counter()
    data_dir = Path("data/digits")
    if not index_path_for(data_dir, "train").exists() or not index_path_for(data_dir, "test").exists():
        build_digits_shards(data_dir, seed=0)
        print(f"built digits shards in {data_dir}")
    run_dir = Path(args.runs) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(["demo.gin"], args.gin_param, run_dir=run_dir, runs_dir=args.runs, progress=True)
    _print_result(result)
    grids = sorted((result.run_dir / "samples").glob("*.png"))
    print(f"sample grid:     {grids[-1] if grids else 'none'}  (row c = class c)")
    for line in demo_summary(result.final_metrics):
        print(line)
    if result.mlflow_run_id:
        print(f"MLflow run:      {mlflow_run_link(result.tracking_uri, result.mlflow_run_id)}  "
              f"(start the UI first: make ui, or selfflow ui --runs {args.runs})")
    print(f"demo wall time:  {time.perf_counter() - started:.0f} s")
    return 0


def demo_summary(metrics: dict[str, float]) -> list[str]:
    """The figures that say how good the demo model is (the newest evaluation's)."""
    lines = []
    if "eval/fd" in metrics:
        floor = metrics.get("eval/fd_data_floor")
        lines.append(f"FD:              {metrics['eval/fd']:.2f}" + (f"  (real-data floor {floor:.2f}; lower is better)"
                                                                      if floor is not None else "  (lower is better)"))
    if "eval/sample_class_acc" in metrics:
        lines.append(f"class accuracy:  {metrics['eval/sample_class_acc']:.3f}  (samples the evaluator reads as "
                     f"their requested digit)")
    if "probe/linear/best" in metrics:
        block = metrics.get("probe/linear/best_block")
        lines.append(f"best probe:      {metrics['probe/linear/best']:.3f}  (linear probe accuracy"
                     + (f", block {int(block)})" if block is not None else ")"))
    return lines or ["evaluation:      none logged (EvalSuite.min_steps or EvalSuite.every skipped it)"]


def mlflow_run_link(tracking_uri: str | None, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI (`ui`: where `make ui` serves; a server store links to itself)."""
    from mlflow.tracking import MlflowClient

    base = tracking_uri.rstrip("/") if tracking_uri and tracking_uri.startswith(("http://", "https://")) else ui
    try:
        experiment_id = MlflowClient(tracking_uri=tracking_uri).get_run(run_id).info.experiment_id
    except Exception:  # the link is a convenience: the run id alone still finds the run
        return f"run {run_id} ({tracking_uri})"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from selfflow.platform.train.saved import evaluate_run

    result = evaluate_run(
        run_dir=args.run_dir, run_id=args.run_id, checkpoint=args.checkpoint, overrides=args.gin_param,
        tracking_uri=args.tracking_uri, runs_dir=args.runs, tracking=not args.no_tracking,
    )
    print(f"run folder:      {result.run_dir}  (step {result.step})")
    if result.mlflow_run_id:
        print(f"mlflow run:      {result.mlflow_run_id}  ({result.tracking_uri})")
    for key in sorted(result.metrics):
        if not key.startswith("probe_grid/"):
            print(f"  {key:<28} {result.metrics[key]:.4f}")
    print(f"artifacts:       {result.run_dir / 'eval'}")
    return 0


def _cmd_sync(args: argparse.Namespace) -> int:
    from selfflow.platform.tracking.mlflow_tracker import sync_run_dir

    result = sync_run_dir(args.run_dir, tracking_uri=args.tracking_uri, seconds=args.timeout, runs_dir=args.runs)
    stats = result.stats
    print(f"synced {result.journal} -> {result.tracking_uri}: {stats.records} of {result.pending_before} records "
          f"delivered ({stats.metric_values} metric values sent, {stats.duplicates} already present)")
    if result.pending_after:
        raise UserError(f"{result.pending_after} records still undelivered: the store at {result.tracking_uri} "
                        f"stopped answering; run sync again")
    return 0


def ui_command(runs: str, host: str, port: int, tracking_uri: str | None = None) -> list[str]:
    """The `mlflow server` command line `selfflow ui` runs for a runs folder (platform/tracking/ui.py)."""
    from selfflow.platform.tracking.mlflow_tracker import default_tracking_uri
    from selfflow.platform.tracking.ui import server_command

    return server_command(tracking_uri or default_tracking_uri(runs), host, port)


def _cmd_ui(args: argparse.Namespace) -> int:
    from selfflow.platform.tracking.mlflow_tracker import default_tracking_uri
    from selfflow.platform.tracking.ui import serve

    return serve(default_tracking_uri(args.runs), args.host, args.port)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"print full tracebacks, also from Ray workers and Tune trials ({DEBUG_ENV}=1 does too)")
    common.add_argument("--host-tuning", dest="host_tuning", choices=host.PRESETS, default=argparse.SUPPRESS,
                        help="host tuning preset: stock (PyTorch as it comes) or cpu_shared (for a few shared CPU "
                             "cores: platform/host.py); default: the config's TrainConfig.host, else stock")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="selfflow", description="Self-supervised flow matching experiments.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    original_add_parser = sub.add_parser

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return original_add_parser(name, parents=[common], **kwargs)

    sub.add_parser = add_parser  # every subcommand takes --debug and --host-tuning

    p = sub.add_parser("train", help="train one experiment from gin files")
    _add_gin_args(p)
    p.add_argument("--run-dir", default=None, help="run folder (default: <runs>/<experiment name>)")
    p.add_argument("--runs", default="runs", help="folder for runs and the embedded MLflow store")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint and its MLflow run")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="data-parallel Ray Train workers (TorchTrainer; RAY_ADDRESS picks a cluster)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (NCCL); 0 = CPU and gloo")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker")
    p.add_argument("--max-failures", type=int, default=2,
                   help="restarts of a failed worker group from its last checkpoint (-1: forever)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sweep", help="a Ray Tune sweep over gin bindings (experiments/sweeps/*.gin)")
    p.add_argument("sweep_file", help="sweep gin file, e.g. sweeps/digits_objectives.gin")
    p.add_argument("--gin_param", "--gin-param", action="append", default=[], metavar="BINDING",
                   help="override a Sweep binding, e.g. \"Sweep.seeds = [0]\"")
    p.add_argument("--runs", default="runs", help="folder for runs and the embedded MLflow store")
    p.add_argument("--sweep-dir", default=None, help="sweep folder (default: <runs>/sweeps/<name>-<time>)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-compare", action="store_true", help="skip the comparison at the end")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("study", help="run a study's sweeps (experiments/studies/*.gin) and write its report "
                                     "(RESULTS.md) from MLflow; resumes where an earlier sitting stopped")
    p.add_argument("study_file", help="study gin file, e.g. studies/paper.gin")
    p.add_argument("--gin_param", "--gin-param", action="append", default=[], metavar="BINDING",
                   help="override a Study binding, e.g. \"Study.seeds = [0, 1, 2, 3]\"")
    p.add_argument("--quick", action="store_true",
                   help="the same study at its quick budget (Study.quick_bindings): minutes, for tests and CI")
    p.add_argument("--report-only", action="store_true", help="train nothing; rewrite the report from the store")
    p.add_argument("--plan", action="store_true", help="print the sweeps, trials and what is finished; run nothing")
    p.add_argument("--section", action="append", default=None,
                   help="run only this section of the study (repeatable); the report covers all")
    p.add_argument("--out", default=None, help="report file (default: RESULTS.md; with --quick "
                                               "<runs>/studies/<name>-quick/RESULTS.md)")
    p.add_argument("--plots-dir", default=None, help="folder for the plots (default: results/ beside the report)")
    p.add_argument("--runs", default="runs", help="folder for runs and the embedded MLflow store")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else <runs>/mlflow.db)")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("compare", help="compare runs: mean ± 95%% interval over seeds, metric-vs-step plots")
    p.add_argument("--experiment", default=None, help="MLflow experiment name")
    p.add_argument("--parent", default=None, help="a sweep's parent run id (compares its children)")
    p.add_argument("--filter", default=None, help="MLflow filter string, e.g. \"tags.objective = 'SelfFlowObjective'\"")
    p.add_argument("--metric", action="append", default=[], help="metric column (repeatable)")
    p.add_argument("--out", default="runs/compare", help="folder for the table, CSV and plots")
    p.add_argument("--runs", default="runs", help="folder of the embedded MLflow store")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("data", help="build webdataset shards")
    p.add_argument("dataset", choices=["digits", "moving_digits", "spoken_digits", "images", "encode"],
                   help="digits, moving_digits (video clips of the same glyphs), spoken_digits (the digit words "
                        "spoken by espeak-ng, audio), images: pre-encode an image "
                        "folder (ROOT/<class>/<image>) into latent shards, or encode: pre-encode every split of "
                        "the shard set --source (e.g. 24 kHz spoken digits with EnCodec) into float32 latent shards")
    p.add_argument("--source", default=None, help="encode: the shard set folder to encode")
    p.add_argument("--out", default=None, help="output folder (default: data/<dataset>)")
    p.add_argument("--folder", default=None, help="images: the class-folder tree to encode")
    p.add_argument("--tokenizer-gin", "--tokenizer_gin", dest="tokenizer_gin", default=None,
                   help="images, encode: gin file binding autoencoder.tokenizer (e.g. tokenizers/sd_vae_ema.gin)")
    p.add_argument("--split", default="train", help="images: shard set name (train, val, test, ...)")
    p.add_argument("--image-size", type=int, default=None, help="images: crop size (default: the tokenizer's)")
    p.add_argument("--shard-size", type=int, default=1000, help="images: samples per shard")
    p.add_argument("--batch-size", type=int, default=32, help="images: images per encoder batch")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="images: latent storage")
    p.add_argument("--num-workers", type=int, default=0, help="images: image-decoding worker processes")
    p.add_argument("--gin_param", "--gin-param", action="append", default=[], metavar="BINDING",
                   help="images: tokenizer binding, e.g. \"SDVAETokenizer.device = 'cuda'\"")
    p.add_argument("--quiet", action="store_true", help="images: no progress line")
    p.add_argument("--seed", type=int, default=0, help="seed of the digits train/test split and of the clips' motion (images: of the write order)")
    p.add_argument("--sample-rate", type=int, default=None, help="spoken_digits: Hz (default 8000; 24000 for EnCodec)")
    p.add_argument("--duration", type=float, default=None, help="spoken_digits: seconds per clip (default 0.64)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("autoencoder", help="train a conv autoencoder tokenizer (tokenizers/conv_ae_*_train.gin)")
    _add_gin_args(p)
    p.set_defaults(func=_cmd_autoencoder)

    p = sub.add_parser("encoder", help="train a REPA external encoder from a gin file (encoders/digits_*.gin)")
    _add_gin_args(p)
    p.set_defaults(func=_cmd_encoder)

    p = sub.add_parser("sample", help="sample a class grid from a run's EMA model")
    p.add_argument("--run-dir", required=True, help="a run folder written by `selfflow train`")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: newest in the run)")
    p.add_argument("--out", default=None, help="output folder (default: <run-dir>/samples)")
    p.add_argument("--gin_param", "--gin-param", action="append", default=[],
                   help="override sampling bindings, e.g. SamplingConfig.steps=64")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("eval", help="evaluate a run's EMA model (FD, probes, loss by t) into its MLflow run")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-dir", default=None, help="a run folder written by `selfflow train`")
    which.add_argument("--run-id", default=None, help="an MLflow run id (its run_dir tag names the folder)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: newest in the run)")
    p.add_argument("--runs", default=None, help="runs folder holding mlflow.db (default: the run folder's parent)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or --runs)")
    p.add_argument("--no-tracking", action="store_true", help="print and write artifacts only, log nothing")
    p.add_argument("--gin_param", "--gin-param", action="append", default=[],
                   help="override evaluation bindings, e.g. EvalSuite.num_samples=2000")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("sync", help="deliver a run's queued tracking records (tracking-journal.jsonl) to MLflow")
    p.add_argument("--run-dir", required=True, help="a run folder written by `selfflow train`")
    p.add_argument("--tracking-uri", default=None,
                   help="the store to deliver to; default: the configured one (MLFLOW_TRACKING_URI, else "
                        "<runs>/mlflow.db), which must be the store the run's journal names")
    p.add_argument("--runs", default="runs", help="folder of the embedded MLflow store (the default store)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to keep retrying an unanswering store")
    p.set_defaults(func=_cmd_sync)

    p = sub.add_parser("ui", help="serve the MLflow UI for a runs folder (one worker, on 127.0.0.1 unless --host says "
                                  "otherwise); Ctrl-C stops it and everything it started")
    p.add_argument("--runs", default="runs", help="folder of the embedded MLflow store")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; anything but 127.0.0.1 exposes the runs")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser("demo", help="build digits shards and train the demo model (what `make demo` runs)")
    p.add_argument("--runs", default="runs")
    p.add_argument("--gin_param", "--gin-param", action="append", default=[])
    p.set_defaults(func=_cmd_demo)
    return parser


def apply_host_preset(args: argparse.Namespace) -> None:
    """The host preset, before any command imports torch: --host-tuning, else the gin files'
    TrainConfig.host. An explicit --host-tuning also becomes a binding, so the run's config records
    what was applied."""
    chosen = getattr(args, "host_tuning", None)
    if chosen is not None:
        if hasattr(args, "gin_param"):
            args.gin_param = [*args.gin_param, f"TrainConfig.host = '{chosen}'"]
        host.apply_before_torch(chosen)
        return
    files = getattr(args, "gin_file", None) or []
    if getattr(args, "command", "") == "demo":
        files = ["demo.gin"]
    if files:
        from selfflow.platform.config import bootstrap

        preset = bootstrap.peek_binding(files, getattr(args, "gin_param", []), "TrainConfig.host")
        if preset in host.PRESETS:
            host.apply_before_torch(preset)


def report_failure(error: BaseException) -> int:
    """One line for the user (the full traceback under --debug, else in error.log); the exit code."""
    if isinstance(error, (UserError, TrainingError)):
        print(f"selfflow: error: {error.one_line()}", file=sys.stderr)
        if debug_enabled():
            traceback.print_exception(error)
        return error.exit_code
    if isinstance(error, DataError):  # a damaged or unsafe shard found mid-training
        print(f"selfflow: error: {' '.join(str(error).split())}", file=sys.stderr)
        if debug_enabled():
            traceback.print_exception(error)
        return UserError.exit_code
    if debug_enabled():
        traceback.print_exception(error)
        return 1
    # An error from user or library code: its type and first line, and where its traceback is.
    log = getattr(error, "traceback_file", None) or write_traceback(error, Path(tempfile.gettempdir()) / "selfflow")
    where = f"full traceback in {log}" if log else "traceback not written"
    print(f"selfflow: error: {one_line(error)} ({where}; --debug prints it)", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "debug", False):
        os.environ[DEBUG_ENV] = "1"  # Ray workers and Tune trials inherit it
    from selfflow.platform.train.interrupts import RunInterrupted, handle_signals

    try:
        with handle_signals():  # SIGINT and SIGTERM: stop at the end of the step, mark the run KILLED
            apply_host_preset(args)
            return args.func(args)
    except RunInterrupted as interrupt:
        print(f"selfflow: {interrupt.one_line()}", file=sys.stderr, flush=True)
        return interrupt.exit_code
    except KeyboardInterrupt:
        print("selfflow: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return report_failure(error)


if __name__ == "__main__":
    sys.exit(main())
