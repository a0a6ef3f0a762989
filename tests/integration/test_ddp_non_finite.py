"""Data parallelism and non-finite losses: when one rank's loss is NaN, every rank must take the
same branch (skip or stop). The decision is made on the device (a vote all-reduced with the step,
a masked update) and read at the next log step (`check_finite`): every rank runs the same
collectives either way. Two gloo processes, no Ray: the vote is torch's."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfflow.platform.config import bootstrap as config
from selfflow.platform.errors import TrainingError
from selfflow.platform.train.driver import rebuild_experiment
from selfflow.platform.train.parallel import ddp_wrapper
from selfflow.platform.train.trainer import Trainer

pytestmark = pytest.mark.timeout(300)

PARAMS = [
    "TrainConfig.batch_size = 16",  # the global batch: 8 per rank
    "TrainConfig.checkpoint_every = 0",
    "TrainConfig.eval_every = 0",
    "build_experiment.evaluation = None",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, config_str: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        experiment = rebuild_experiment(config_str)
        trainer = Trainer(experiment, iter(()), Path(out_dir) / f"rank{rank}", rank=rank,
                                     world_size=world_size, wrap_module=ddp_wrapper(), progress=False)
        generator = torch.Generator().manual_seed(rank)
        x = torch.randn(8, 1, 8, 8, generator=generator)
        y = torch.randint(0, 10, (8,), generator=generator)
        trainer.train_step({"x": x, "y": y})
        trainer.step += 1
        healthy = bool(trainer.last_applied)
        poisoned = x.clone()
        if rank == 1:
            poisoned[0, 0, 0, 0] = float("nan")  # only rank 1 sees a bad batch
        before = [p.detach().clone() for p in trainer.module.parameters()]
        outcome: str
        try:
            trainer.train_step({"x": poisoned, "y": y})
            trainer.step += 1
            unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.module.parameters()))
            trainer.check_finite()  # what the loop does at a log step
            outcome = f"skipped={trainer.skipped} applied={bool(trainer.last_applied)} unchanged={unchanged}"
        except TrainingError as error:
            outcome = f"stopped: {error}"
        (Path(out_dir) / f"rank{rank}.txt").write_text(f"healthy={healthy} {outcome}")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(policy: str, tmp_path: Path) -> list[str]:
    config_str = config.parse(["digits/fm.gin"], [*PARAMS, f"TrainConfig.nan_policy = '{policy}'"])
    context = mp.start_processes(_worker, args=(2, _free_port(), config_str, str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    while not context.join(timeout=240):
        pass
    return [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]


def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path):
    results = _run_two_ranks("skip", tmp_path)
    assert results == ["healthy=True skipped=1 applied=False unchanged=True"] * 2, results


def test_a_nan_on_one_rank_stops_every_rank(tmp_path):
    rank0, rank1 = _run_two_ranks("raise", tmp_path)
    assert rank0.startswith("healthy=True stopped: non-finite loss term on another rank at step 2; "), rank0
    assert rank1.startswith("healthy=True stopped: non-finite loss term '"), rank1
    assert " at step 2; " in rank1, rank1
