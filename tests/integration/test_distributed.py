"""Ray Train data parallelism: DDP equivalence, exact recovery of a dead worker, gin round trip.

DDP equivalence design: rank r draws its objective randomness (t, eps, masks, label dropout)
from its own generator seeded `seed * 1000 + r` and reads shard slot r of the data. The
reference is ONE process that, each step, takes the batch of every rank (the concatenation
of the ranks' batches), evaluates the objective on rank r's part with rank r's generator
(the draws arranged as the ranks made them), averages the ranks' losses (what DDP's gradient
all-reduce computes), and takes one optimizer step. Same seed, same global batch, so the
parameters must agree to float rounding.
"""
from __future__ import annotations

import math
from pathlib import Path

import gin
import pytest
import torch
from selfflow_testing.faults import InjectedCrash, crash_bindings
from selfflow_testing.workers import rebuild_operative_config
from torch import nn

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.experiment import build_from_gin
from selfflow.platform.errors import ConfigError
from selfflow.platform.scale import ray_cluster
from selfflow.platform.scale.ray_train import Scaling, plain_error, train_distributed
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.driver import rebuild_experiment
from selfflow.platform.train.trainer import Trainer

pytestmark = pytest.mark.timeout(900)

STEPS = 4
SMALL = [
    f"TrainConfig.steps = {STEPS}",
    "TrainConfig.batch_size = 8",
    "TrainConfig.log_every = 1",
    "TrainConfig.checkpoint_every = 1",
    "TrainConfig.eval_every = 0",
    "build_experiment.evaluation = None",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
]


def reference_state(config_str: str, world_size: int, run_dir: Path) -> dict:
    """One process, the concatenated global batch, each rank's draws on its own part."""
    experiment = rebuild_experiment(config_str)
    cfg = experiment.train
    trainer = Trainer(experiment, iter(()), run_dir, progress=False)
    # TrainConfig.batch_size is the global batch: each rank reads batch_size / world_size.
    loaders = [experiment.data.loader(batch_size=cfg.batch_size // world_size, seed=cfg.seed, rank=r,
                                      world_size=world_size)
               for r in range(world_size)]
    generators = [torch.Generator().manual_seed(cfg.seed * 1000 + r) for r in range(world_size)]
    trainable = [p for p in trainer.module.parameters() if p.requires_grad]
    for _ in range(cfg.steps):
        global_batch = [next(loader) for loader in loaders]
        losses = [trainer.module(trainer.make_batch(part), trainer.ema.model, generator).total()
                  for part, generator in zip(global_batch, generators)]
        loss = sum(losses) / world_size
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        trainer.optimizer.step()
        trainer.lr_schedule.step()
        trainer.ema.update(trainer.module.model)
    return {"model": trainer.module.model.state_dict(), "objective": trainer.module.objective.state_dict(),
            "ema": trainer.ema.model.state_dict()}


def test_two_workers_equal_one_process_and_survive_a_dead_worker(ray_local, in_tmp):
    """2 gloo workers, rank 1 killed (os._exit) after step 2: Ray restarts the group from the
    step-2 checkpoint, and the result still equals the uninterrupted single-process reference."""
    params = [*SMALL, *crash_bindings(at_step=2, rank=1)]
    result = train_distributed(["digits/selfflow.gin"], params, scaling=Scaling(workers=2, max_failures=2),
                               run_dir=in_tmp / "ddp", runs_dir=in_tmp / "runs")
    assert (in_tmp / "ddp" / "injected_crash.done").is_file(), "the worker was never killed"
    assert result.final_metrics["dist/replica_divergence"] == 0.0  # per-rank parameters identical
    state = ckpt.load(result.checkpoint)
    assert state["step"] == STEPS and len(state["rank_generators"]) == 2

    config_str = config.parse(["digits/selfflow.gin"], SMALL)
    expected = reference_state(config_str, world_size=2, run_dir=in_tmp / "reference")
    for part, reference in (("model", expected["model"]), ("objective", expected["objective"]),
                            ("ema", expected["ema"])):
        got = state["ema"]["model"] if part == "ema" else state[part]
        assert set(got) == set(reference)
        for key in reference:
            torch.testing.assert_close(got[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    runs = client.search_runs([client.get_run(result.mlflow_run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]  # the restart did not fork the run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["ray.workers"] == "2"
    history = client.get_metric_history(result.mlflow_run_id, "loss/total")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # each step once, only rank 0 wrote


def test_gin_config_round_trips_through_a_ray_worker(ray_local, in_tmp):
    import ray

    config_str = config.parse(["digits/selfflow.gin"], SMALL)
    build_from_gin()
    driver = gin.operative_config_str()
    rebuild = ray.remote(num_cpus=1)(rebuild_operative_config)
    in_worker = ray.get(rebuild.remote(config_str), timeout=600)
    assert in_worker == driver
    assert "SelfFlowObjective.gamma = 0.8" in in_worker
    overridden = ray.get(rebuild.remote(config_str, ("SelfFlowObjective.gamma = 0.5",)), timeout=600)
    assert "SelfFlowObjective.gamma = 0.5" in overridden and overridden != driver
    # A gin proxy error raised in the worker comes back as a plain, one-line exception.
    with pytest.raises(ConfigError, match="TrainConfig.steps must be positive"):
        ray.get(rebuild.remote(config_str, ("TrainConfig.steps = 0",)), timeout=600)


def test_local_ray_leaves_home_alone(ray_local):
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    assert not str(session_dir).startswith(str(Path.home()))
    for name, existed in ray_local["home_before"].items():
        assert existed or not (Path.home() / name).exists(), f"Ray wrote ~/{name}"


def test_plain_error_turns_gin_proxies_into_picklable_exceptions():
    import pickle

    config.parse(["digits/fm.gin"], ["TrainConfig.steps = -1"])
    with pytest.raises(Exception) as caught:
        gin.get_configurable("selfflow.TrainConfig")()
    proxy = caught.value
    copy = plain_error(proxy)
    restored = pickle.loads(pickle.dumps(copy))
    assert isinstance(restored, ConfigError) and "\n" not in str(restored)
    assert "TrainConfig.steps must be positive" in str(restored)


def test_plain_error_keeps_the_workers_traceback_under_debug(monkeypatch):
    import pickle

    def buggy():
        return {}["missing"]

    try:
        buggy()
    except KeyError as error:
        caught = error
    assert "\n" not in str(plain_error(caught))
    monkeypatch.setenv("SELFFLOW_DEBUG", "1")
    copy = pickle.loads(pickle.dumps(plain_error(caught)))
    assert isinstance(copy, KeyError) and "Traceback (most recent call last)" in str(copy) and "buggy" in str(copy)


def test_injected_crash_fires_once(tmp_path):
    class FakeTrainer:
        step, rank, run_dir = 3, 0, tmp_path

    crash = InjectedCrash(at_step=3, hard=False)
    with pytest.raises(RuntimeError, match="injected crash at step 3"):
        crash.on_step_end(FakeTrainer(), {})
    crash.on_step_end(FakeTrainer(), {})  # the marker says it already happened
    assert (tmp_path / "injected_crash.done").read_text().strip() == str(tmp_path.resolve())


def test_requests_larger_than_the_cluster_are_refused():
    from selfflow.platform.errors import UserError
    from selfflow.platform.scale.ray_cluster import ClusterInfo, check_fits

    two_cores = ClusterInfo(address="local", local=True, num_cpus=2.0, num_gpus=0.0)
    check_fits(two_cores, workers=2, cpus_per_worker=1, gpus_per_worker=0, what="training")
    with pytest.raises(UserError, match="needs 3 workers x 1 CPU = 3 CPUs; the Ray cluster has 2"):
        check_fits(two_cores, workers=3, cpus_per_worker=1, gpus_per_worker=0, what="training")
    with pytest.raises(UserError, match="GPUs; the Ray cluster has 0"):
        check_fits(two_cores, workers=1, cpus_per_worker=1, gpus_per_worker=1, what="training")


def _listening() -> dict[int, set[str]]:
    """Listening TCP port -> the addresses it listens on (hex, as /proc/net/tcp{,6} write them)."""
    found: dict[int, set[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, port = fields[1].split(":")
                found.setdefault(int(port, 16), set()).add(address)
    return found


LOOPBACK_HEX = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_local_ray_listens_on_loopback_only_in_a_private_folder(ray_local):
    """Issue 26: Ray's services listened on every interface and wrote to a fixed, world-writable
    temp folder."""
    import os
    import stat

    import ray

    host, port = ray_local["cluster"].address.rsplit(":", 1)
    assert host == "127.0.0.1"
    node = ray.nodes()[0]
    ports = {int(port), node["NodeManagerPort"], node["ObjectManagerPort"]}
    listening = _listening()
    for number in ports:
        assert listening.get(number) and listening[number] <= LOOPBACK_HEX, (number, listening.get(number))
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    assert session.parent.name == "ray"  # Ray's own folder (it makes it 0777) inside the private one
    private = session.parent.parent
    info = os.stat(private)
    assert info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) == 0o700, private
    assert private == Path(os.environ.get("SELFFLOW_RAY_TMPDIR") or ray_cluster.default_tmp_dir()).resolve()


def test_private_tmp_dir_is_created_tightened_or_refused(tmp_path):
    import os
    import stat

    from selfflow.platform.errors import UserError

    fresh = ray_cluster.private_tmp_dir(tmp_path / "fresh")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    ray_cluster.private_tmp_dir(shared)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o700  # ours: tightened
    (tmp_path / "link").symlink_to(fresh)
    with pytest.raises(UserError, match="is not a plain folder"):
        ray_cluster.private_tmp_dir(tmp_path / "link")
    if os.geteuid() == 0:  # only root can hand a folder to another user
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, 65534, 65534)
        with pytest.raises(UserError, match=r"belongs to another user \(uid 65534\)"):
            ray_cluster.private_tmp_dir(other)
