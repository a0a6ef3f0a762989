"""Item 3, data path: samples/s the webdataset shard loader delivers vs samples/s training consumes.

The loader is the one the trainer uses (ShardData.loader over the digits shards: tar
parsing, member checks, npy decoding, seeded shuffle buffer, collation), timed alone for
0, 1 and 2 worker processes. Consumption is the digits training step (the fastest
config, so the hardest to feed), measured in the same run. A second table trains with
the real loader in the loop vs an in-memory batch: the stall the data path causes.
"""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

from bench import workloads as setup
from bench.core import BenchContext, Section, Table, Target, interleaved, paired_ratio

KEY = "data"
TARGET_RATIO = 10.0


def ensure_digits_shards(cache_dir: Path) -> Path:
    """The digits shard set under the bench cache (built once, seeded)."""
    from selfflow.platform.data.shards import build_digits_shards

    root = Path(cache_dir) / "data" / "digits"
    if not (root / "train.index.json").is_file() or not (root / "test.index.json").is_file():
        build_digits_shards(root, seed=0)
    return root


def loader_rate(root: Path, batch_size: int, num_workers: int, batches: int) -> dict[str, float]:
    """Samples/s of the shard loader: its first epoch (cold: tar and npy parsing) and, after
    two more epochs, `batches` further batches (warm: what a long run sees)."""
    from selfflow.platform.data.sources import ShardData

    data = ShardData(root=str(root), num_classes=10, data_shape=(1, 8, 8), dataset="digits",
                     num_workers=num_workers)
    loader = data.loader(batch_size=batch_size, seed=0)
    try:
        epoch = loader.dataset.batches_per_epoch(0, num_workers)
        start = time.perf_counter()
        next(loader)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(epoch - 1):
            next(loader)
        cold = (epoch - 1) * batch_size / (time.perf_counter() - start)
        for _ in range(2 * epoch):
            next(loader)
        start = time.perf_counter()
        for _ in range(batches):
            next(loader)
        warm = batches * batch_size / (time.perf_counter() - start)
    finally:
        loader.close()
    return {"samples_per_s": warm, "cold_samples_per_s": cold, "first_batch_s": first, "batches_per_epoch": epoch}


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    root = ensure_digits_shards(ctx.cache_dir)
    config = setup.digits(objective="fm", batch_size=128)
    batches = ctx.pick(60, 15)

    # Training consumption: FM and Self-Flow steps on the digits config, interleaved.
    trainers = {name: setup.build_trainer(config.with_(objective=name), scratch=ctx.cache_dir / "scratch")
                for name in ("fm", "selfflow")}
    raw = setup.synthetic_batch(config)
    steps = interleaved({name: (lambda t=t: t.train_step(raw)) for name, t in trainers.items()},
                        repeats=ctx.pick(10, 3), warmup=1)
    consume = {name: config.batch_size / timing.median for name, timing in steps.items()}
    fastest = max(consume.values())

    rows = []
    rates = {}
    for workers in (0, 1, 2):
        ctx.log(f"[data] loader with {workers} workers, {batches} batches of {config.batch_size}")
        rate = loader_rate(root, config.batch_size, workers, batches)
        rates[workers] = rate["samples_per_s"]
        ratio = rate["samples_per_s"] / fastest
        rows.append([workers, rate["first_batch_s"] * 1e3, rate["cold_samples_per_s"],
                     rate["cold_samples_per_s"] / fastest, rate["samples_per_s"], ratio])
        ctx.results.record(KEY, "loader_samples_per_s", rate["samples_per_s"], "samples/s", workers=workers,
                           batch_size=config.batch_size, batches=batches, first_batch_s=rate["first_batch_s"],
                           cold_samples_per_s=rate["cold_samples_per_s"], over_training=ratio,
                           cold_over_training=rate["cold_samples_per_s"] / fastest)
    for name, value in consume.items():
        ctx.results.record(KEY, "training_samples_per_s", value, "samples/s", config="digits", variant=name,
                           statistic="batch / median step time")
    needed = next((w for w in (0, 1, 2) if rates[w] >= TARGET_RATIO * fastest), None)
    per_worker = max(rates[1], 1e-9)
    estimate = math.ceil(TARGET_RATIO * fastest / per_worker)

    # The stall in the loop: Trainer.fit fed by the real loader (in-process) vs an in-memory batch.
    from selfflow.platform.data.sources import ShardData

    fed = setup.build_trainer(config, scratch=ctx.cache_dir / "scratch")
    fed.data = ShardData(root=str(root), num_classes=10, data_shape=(1, 8, 8)).loader(batch_size=128, seed=0)
    fed.config.log_every = 10**9
    for _ in range(3 * fed.data.dataset.batches_per_epoch(0, 0)):  # past the cold first epochs
        next(fed.data)
    memory = setup.build_trainer(config, scratch=ctx.cache_dir / "scratch")
    memory.data = itertools.repeat(raw)
    memory.config.log_every = 10**9

    def fit_steps(trainer, count: int = 4):
        def call() -> None:
            trainer.config.steps = trainer.step + count
            trainer.fit()
        return call

    loop = interleaved({"real_loader": fit_steps(fed), "in_memory": fit_steps(memory)},
                       repeats=ctx.pick(8, 2), warmup=1)
    stall = paired_ratio(loop["real_loader"], loop["in_memory"])
    ctx.results.record(KEY, "loop_with_loader_over_in_memory", stall, "ratio", workers=0,
                       statistic="median of paired ratios")
    ctx.results.record(KEY, "loader_over_training", rates[0] / fastest, "ratio", workers=0,
                       statistic="later epochs' loader samples/s over the faster objective's")
    targets = [Target("loader samples/s / training samples/s (digits, in-process loader, later epochs)",
                      rates[0] / fastest, TARGET_RATIO, ">=",
                      f"workers needed for 10x: {needed if needed is not None else f'> 2 (about {estimate})'}",
                      absolute=f"loader {rates[0]:,.0f} samples/s, training {fastest:,.0f} samples/s",
                      record={"item": KEY, "metric": "loader_over_training"})]
    tables = [
        Table(["loader workers", "first batch ms", "first epoch samples/s", "first epoch / training",
               "later epochs samples/s", "later epochs / training"],
              rows, title="Shard loader alone (digits, batch 128; training = the faster objective)"),
        Table(["objective", "training step ms", "training samples/s"],
              [[name, steps[name].median * 1e3, consume[name]] for name in steps],
              title="Training consumption (digits config)"),
        Table(["loop fed by", "ms per step"],
              [["real shard loader (0 workers, after 3 epochs)", loop["real_loader"].median * 1e3 / 4],
               ["in-memory batch", loop["in_memory"].median * 1e3 / 4]],
              title=f"Trainer.fit with the loader in the loop: {stall:.3f}x the in-memory time"),
    ]
    return Section(
        key=KEY,
        title="Data path: shard loader throughput vs training consumption",
        command="python -m bench --only data",
        meaning=(
            "Loader throughput is measured over its first epoch after the first batch (which includes opening "
            "shards and, with workers, starting processes): every sample is parsed from tar and npy; and, after "
            "two more epochs, over a fixed number of batches: small shard sets (up to 256 MiB) then replay "
            "their decoded samples from memory (same order, same determinism), which is what a long run sees. "
            "The target is judged on the later epochs. Training consumption is "
            "batch size / median step time of the digits config (FM and Self-Flow, interleaved): the "
            "smallest, fastest config, so the one a loader finds hardest to feed. On this 2-core machine "
            "worker processes compete with training for the same cores, so the in-process rate (0 workers) "
            "is the one that matters; workers pay off only with spare cores."
        ),
        tables=tables,
        targets=targets,
        notes=[f"Workers needed for >= 10x: {needed if needed is not None else f'more than 2 (estimate {estimate})'}."],
        seconds=time.perf_counter() - started,
    )
