"""Global batch and gradient accumulation: TrainConfig.batch_size is the global batch, split into
workers x micro-batch x accumulation steps. Checked against the step written out by hand from its
definition (the gradient of the mean of the micro-batch losses, one clip, one AdamW step, one EMA
update), across workers (2 gloo ranks x accumulation = 1 process x the same global batch), and
across a crash inside an accumulation window. Also: a non-log step reads nothing from the device."""
from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.experiment import TrainConfig, build_from_gin
from selfflow.platform.errors import ConfigError, UserError
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.callbacks import CheckpointEvery
from selfflow.platform.train.driver import rebuild_experiment
from selfflow.platform.train.parallel import ddp_wrapper
from selfflow.platform.train.trainer import Trainer

pytestmark = pytest.mark.timeout(300)

SMALL = [
    "DiT.hidden_dim = 32",
    "DiT.depth = 2",
    "DiT.num_heads = 2",
    "TrainConfig.warmup_steps = 2",
    "TrainConfig.eval_every = 0",
    "TrainConfig.checkpoint_every = 0",
    "build_experiment.evaluation = None",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
]


def micro_batches(count: int, size: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.rand(size, 1, 8, 8, generator=generator), "y": torch.randint(0, 10, (size,), generator=generator)}
            for _ in range(count)]


def build(objective: str, *params: str, run_dir: Path, **trainer_args) -> Trainer:
    config.parse([f"digits/{objective}.gin"], [*SMALL, *params])
    return Trainer(build_from_gin(), iter(()), run_dir, progress=False, **trainer_args)


def hand_step(trainer: Trainer, parts: list[dict], generators: list[torch.Generator]) -> None:
    """The definition: mean of the micro-batch losses, each drawn from its own generator, one
    backward, clip, AdamW, LR schedule, EMA."""
    losses = [trainer.module(trainer.make_batch(part), trainer.ema.model, generator).total()
              for part, generator in zip(parts, generators)]
    loss = sum(losses) / len(losses) if len(losses) > 1 else losses[0]
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainable = [p for p in trainer.module.parameters() if p.requires_grad]
    nn.utils.clip_grad_norm_(trainable, trainer.config.grad_clip if trainer.config.grad_clip > 0 else math.inf)
    trainer.optimizer.step()
    trainer.lr_schedule.step()
    trainer.ema.update(trainer.module.model)


def test_layout_splits_the_global_batch_or_says_why_not():
    assert TrainConfig(batch_size=256).layout(8).describe() == (
        "global batch 256 = 8 workers x micro-batch 32 x 1 accumulation step")
    layout = TrainConfig(batch_size=256, micro_batch=16).layout(8)
    assert (layout.micro_batch, layout.accumulation) == (16, 2)
    assert TrainConfig(batch_size=128).layout(1).micro_batch == 128  # one worker: the batch as before
    with pytest.raises(ConfigError, match=r"^TrainConfig.batch_size = 256 \(the global batch\) is not a multiple of "
                                          r"3 workers x TrainConfig.micro_batch = 32 = 96$"):
        TrainConfig(batch_size=256, micro_batch=32).layout(3)
    with pytest.raises(ConfigError, match="does not divide over 3 workers"):
        TrainConfig(batch_size=256).layout(3)
    with pytest.raises(ConfigError, match="is not a multiple of TrainConfig.micro_batch = 48"):
        TrainConfig(batch_size=256, micro_batch=48)


@pytest.mark.parametrize("objective", ["fm", "selfflow"])
def test_one_micro_batch_is_the_plain_step_bit_for_bit(objective, tmp_path):
    trainer = build(objective, "TrainConfig.batch_size = 8", run_dir=tmp_path / "a")
    reference = build(objective, "TrainConfig.batch_size = 8", run_dir=tmp_path / "b")
    generator = torch.Generator().manual_seed(reference.config.seed * 1000)
    for part in micro_batches(3, 8):
        trainer.train_step(part)
        hand_step(reference, [part], [generator])
    for (name, got), expected in zip(trainer.module.state_dict().items(), reference.module.state_dict().values()):
        assert torch.equal(got, expected), name
    for got, expected in zip(trainer.ema.model.parameters(), reference.ema.model.parameters()):
        assert torch.equal(got, expected)
    assert torch.equal(trainer.generator.get_state(), generator.get_state())


@pytest.mark.parametrize("objective", ["fm", "selfflow"])
def test_accumulated_micro_batches_equal_one_step_on_their_mean(objective, tmp_path):
    trainer = build(objective, "TrainConfig.batch_size = 12", "TrainConfig.micro_batch = 4", run_dir=tmp_path / "a")
    reference = build(objective, "TrainConfig.batch_size = 12", run_dir=tmp_path / "b")
    assert trainer.layout.accumulation == 3 and len(trainer.generators) == 3
    seed = reference.config.seed
    generators = [torch.Generator().manual_seed(seed * 1000 + slot) for slot in range(3)]
    parts = micro_batches(6, 4)
    for window in (parts[:3], parts[3:]):
        logs = trainer.train_step(window)
        hand_step(reference, window, generators)
    assert trainer.ema.updates == reference.ema.updates == 2  # the EMA (Self-Flow's teacher) once per step
    for (name, got), expected in zip(trainer.module.state_dict().items(), reference.module.state_dict().values()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    for got, expected in zip(trainer.ema.model.parameters(), reference.ema.model.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(trainer.generators, generators):  # the same draws, in the same order
        assert torch.equal(ours.get_state(), theirs.get_state())
    # The logged loss is the mean over the micro-batches.
    assert logs["loss/total"].dtype == torch.float64 and math.isfinite(float(logs["loss/total"]))


def _rank_worker(rank: int, port: int, config_str: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from selfflow.components.backbones import embeddings

    embeddings.check_label_range = lambda *args: None  # host labels (see the single-process test below)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trainer = Trainer(rebuild_experiment(config_str), iter(()), Path(out_dir) / f"rank{rank}", rank=rank,
                          world_size=2, wrap_module=ddp_wrapper(), progress=False)
        parts = micro_batches(8, 2)
        trainer.train_step(parts[2 * rank: 2 * rank + 2])  # step 1: rank r holds micro-batches 2r, 2r+1
        with HostReads() as reads:  # step 2 is not a log step: nothing is read from the device
            trainer.train_step(parts[4 + 2 * rank: 4 + 2 * rank + 2])
        torch.save({"model": trainer.module.state_dict(), "reads": reads.calls,
                    "generators": [g.get_state() for g in trainer.generators]}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_with_accumulation_equal_one_worker_with_the_same_global_batch(tmp_path):
    # 2 workers x 2 x 2; alone: 1 x 2 x 4. Without DiT's gathered modulation, a step reads nothing.
    params = ["TrainConfig.batch_size = 8", "TrainConfig.micro_batch = 2", "DiT.gathered_modulation = False"]
    config_str = config.parse(["digits/selfflow.gin"], [*SMALL, *params])
    context = mp.start_processes(_rank_worker, args=(_free_port(), config_str, str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    while not context.join(timeout=240):
        pass
    alone = build("selfflow", *params, run_dir=tmp_path / "alone")
    assert alone.layout.accumulation == 4
    parts = micro_batches(8, 2)
    alone.train_step(parts[:4])
    alone.train_step(parts[4:])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank in ranks:
        assert rank["reads"] == [], rank["reads"]
        for (name, expected), got in zip(alone.module.state_dict().items(), rank["model"].values()):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    slots = [state for rank in ranks for state in rank["generators"]]  # slot = rank x 2 + micro-step
    assert all(torch.equal(a, b.get_state()) for a, b in zip(slots, alone.generators))


class HostReads(TorchDispatchMode):
    """Records every operator that reads a tensor's value to the host (item(), bool(), float(),
    tolist(), numpy()) or whose output size depends on values (nonzero, masked_select, unique): on
    a GPU, each one waits for the device to finish its queue."""

    SYNCING = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique",
               "aten.unique", "aten.repeat_interleave.Tensor", "aten.equal")
    READERS = ("tolist", "numpy")  # read CPU memory without dispatching an operator

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self._originals = {name: getattr(torch.Tensor, name) for name in self.READERS}

    def __enter__(self):
        for name, original in self._originals.items():
            def reader(tensor, *args, _name=name, _original=original, **kwargs):
                self.calls.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, reader)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.SYNCING):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("objective, policy, gathered", [("fm", "raise", True), ("selfflow", "raise", False),
                                                       ("selfflow", "skip", False), ("selfflow", "raise", True)])
def test_a_step_reads_nothing_from_the_device_until_a_log_step(objective, policy, gathered, tmp_path, monkeypatch):
    # The label range check reads labels on the host: on a GPU it runs on the loader's CPU labels
    # (Trainer.make_batch); on the CPU, where those labels are the model's input, inside the embedder.
    monkeypatch.setattr("selfflow.components.backbones.embeddings.check_label_range", lambda *args: None)
    trainer = build(objective, "TrainConfig.batch_size = 8", "TrainConfig.micro_batch = 4",
                    f"TrainConfig.nan_policy = '{policy}'", f"DiT.gathered_modulation = {gathered}", run_dir=tmp_path)
    parts = micro_batches(6, 4)
    trainer.train_step(parts[:2])  # the first step builds AdamW's state
    with HostReads() as reads:
        for start in (2, 4):
            trainer.running.add(trainer.train_step(parts[start:start + 2]), trainer.last_applied)
    if objective == "selfflow" and gathered:
        # The one read left: DiT's gathered modulation sizes its rows with torch.unique (per-token
        # levels), once in the student's forward of each micro-batch (the teacher's level is per sample).
        assert reads.calls == ["aten._unique2.default"] * 4
    else:
        assert reads.calls == []
    with HostReads() as reads:  # a log step reads: the flags and the means, once each
        trainer.check_finite()
        means = trainer.running.flush()
    assert reads.calls == (["Tensor.tolist"] * (2 if policy == "raise" else 1)) and math.isfinite(means["loss/total"])


def test_a_crash_inside_an_accumulation_window_resumes_exactly(in_tmp):
    params = ["TrainConfig.steps = 4", "TrainConfig.batch_size = 16", "TrainConfig.micro_batch = 8",
              "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 2"]

    def trainer_for(run: str, *extra: str) -> Trainer:
        config.parse(["digits/selfflow.gin"], [*SMALL, *params, *extra])
        experiment = build_from_gin()
        data = experiment.data.loader(batch_size=experiment.train.layout(1).micro_batch, seed=0)
        return Trainer(experiment, data, in_tmp / run, callbacks=[CheckpointEvery(2)], progress=False)

    full = trainer_for("full")
    full.fit()

    class Interrupted(Exception):
        pass

    crashing = trainer_for("split")

    class CrashInWindow:
        """The loader, until step 3's first micro-batch is in: its second never comes."""

        def __init__(self, loader):
            self.loader, self.taken = loader, 0

        def __next__(self):
            self.taken += 1
            if self.taken == 6:
                raise Interrupted
            return next(self.loader)

        def state_dict(self):
            return self.loader.state_dict()

    crashing.data = CrashInWindow(crashing.data)
    with pytest.raises(Interrupted):
        crashing.fit()
    assert [step for step, _ in ckpt.list_checkpoints(in_tmp / "split" / "checkpoints")] == [2]
    resumed = trainer_for("split")
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    final = {name: ckpt.load(ckpt.latest(in_tmp / run / "checkpoints")) for name, run in
             (("full", "full"), ("resumed", "split"))}
    for part in ("model", "objective"):
        for key, value in final["full"][part].items():
            assert torch.equal(value, final["resumed"][part][key]), f"{part}.{key}"
    for key, value in final["full"]["ema"]["model"].items():
        assert torch.equal(value, final["resumed"]["ema"]["model"][key]), key
    assert final["full"]["rank_generators"][1].equal(final["resumed"]["rank_generators"][1])

    other = trainer_for("split", "TrainConfig.micro_batch = 4")
    with pytest.raises(UserError, match=r"was written with global batch 16 = 1 worker x micro-batch 8 x 2 accumulation "
                                        r"steps; this run has global batch 16 = 1 worker x micro-batch 4 x 4 "
                                        r"accumulation steps: resume with the same"):
        other.resume()
