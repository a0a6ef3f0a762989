"""Evaluation off the critical path (TrainConfig.eval_mode): with 2 gloo workers an evaluation that
takes longer than the process group's timeout runs in a separate process while both ranks keep
training; its metrics land in the run at the step they belong to. In one process, the background
evaluation writes the same sample grid as the inline one."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfflow.platform.config import bootstrap as config
from selfflow.platform.train.driver import RunSpec, run_training, train
from selfflow.platform.train.parallel import ddp_wrapper

pytestmark = pytest.mark.timeout(600)

STEPS = 8
SMALL = [
    "DiT.hidden_dim = 32",
    "DiT.depth = 2",
    "DiT.num_heads = 2",
    f"TrainConfig.steps = {STEPS}",
    "TrainConfig.batch_size = 16",
    "TrainConfig.log_every = 1",
    "TrainConfig.checkpoint_every = 0",
    "TrainConfig.eval_every = 0",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
]
SLOW = ["import selfflow_testing.slow_eval", "build_experiment.evaluation = @SlowSuite()",
        "SlowSuite.seconds = 14", "SlowSuite.at_step = 2", "TrainConfig.process_group_timeout_s = 10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, spec: RunSpec, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s))
    try:
        run_training(spec, rank=rank, world_size=2, wrap_module=ddp_wrapper())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_slow_evaluation_does_not_stall_two_workers(in_tmp):
    config_str = config.parse(["digits/fm.gin"], [*SMALL, *SLOW])
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    from selfflow.platform.tracking.mlflow_tracker import MLflowTracker

    # As the Ray launcher does: the run is opened before the workers start, so rank 0 only reopens it.
    launcher = MLflowTracker(tracking_uri=uri, experiment="selfflow", run_name="slow")
    spec = RunSpec(config_str=config_str, run_dir=str(in_tmp / "run"), cwd=str(in_tmp), tracking_uri=uri,
                   mlflow_run_id=launcher.run_id)
    context = mp.start_processes(_rank, args=(_free_port(), spec, 10.0), nprocs=2, join=False, start_method="spawn")
    while not context.join(timeout=500):  # raises if a rank failed (e.g. a collective timed out)
        pass

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("selfflow").experiment_id])[0]
    assert run.info.status == "FINISHED"
    losses = {m.step: m.timestamp for m in client.get_metric_history(run.info.run_id, "loss/total")}
    assert sorted(losses) == list(range(1, STEPS + 1))
    evaluation = {name: client.get_metric_history(run.info.run_id, f"eval/{name}")
                  for name in ("slow_step", "slow_started", "slow_finished", "slow_pid")}
    assert [(m.step, m.value) for m in evaluation["slow_step"]] == [(2, 2.0)]  # at the step it evaluated
    started, finished = evaluation["slow_started"][0].value, evaluation["slow_finished"][0].value
    assert finished - started >= 14 > 10  # longer than the process group's timeout
    # Training went on: every step was logged while the evaluation was still running.
    assert max(losses.values()) / 1000 < finished
    walls = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "timing/eval/background_wall_seconds")}
    assert walls[2] >= 14


def test_background_evaluation_writes_what_inline_evaluation_writes(in_tmp):
    params = [*SMALL, "TrainConfig.steps = 2", "TrainConfig.eval_every = 2", "build_experiment.evaluation = None"]
    for mode in ("inline", "background"):
        train(["digits/fm.gin"], [*params, f"TrainConfig.eval_mode = '{mode}'"], run_dir=in_tmp / mode,
              runs_dir=in_tmp / "runs", tracking=False, progress=False)
    inline = (in_tmp / "inline" / "samples" / "step-00000002.png").read_bytes()
    assert (in_tmp / "background" / "samples" / "step-00000002.png").read_bytes() == inline
    assert not list((in_tmp / "background" / "eval" / "background").glob("*.pt"))  # snapshots removed
