"""Item 11, checkpoint writes: how long the training loop is blocked per save, blocking vs background.

`Trainer.save_checkpoint` on a trainer that has taken a step (AdamW moments exist), digits and S:
with TrainConfig.checkpoint_mode = 'blocking' (write, fsync, rename and read the whole file back for
its CRCs before the loop goes on: the platform before this item) and 'background' (the state
copied to host memory, the rest on a thread; the file's guarantees are the same), the copy going
into buffers kept between saves or, as before they were kept, into fresh ones. Blocked time is
what `save_checkpoint` takes; the background write's own duration is reported beside it. The three
modes alternate, in this process (cpu_shared), into a scratch folder that is removed afterwards.
"""
from __future__ import annotations

import shutil
import statistics
import time

from bench import workloads as setup
from bench.core import BenchContext, Section, Table, Target
from selfflow.platform.train import checkpoint as ckpt

KEY = "checkpoint"
TARGET_RATIO = 0.25  # blocked time, background / blocking


def measure(ctx: BenchContext, config: setup.BenchConfig, repeats: int) -> dict:
    folder = ctx.cache_dir / "checkpoint-bench"
    shutil.rmtree(folder, ignore_errors=True)
    trainer = setup.build_trainer(config, scratch=folder)
    trainer.train_step(setup.synthetic_batch(config))
    writers = {"blocking": ckpt.CheckpointWriter(background=False),
               "background": ckpt.CheckpointWriter(background=True, keep_buffers=True),
               "background_fresh": ckpt.CheckpointWriter(background=True, keep_buffers=False)}
    blocked = {mode: [] for mode in writers}
    total = []
    try:
        for round_index in range(repeats):
            order = list(writers) if round_index % 2 == 0 else list(reversed(writers))
            for mode in order:
                trainer.writer = writers[mode]
                trainer.step += 1
                tick = time.perf_counter()
                trainer.save_checkpoint()
                blocked[mode].append(time.perf_counter() - tick)
                trainer.writer.wait()
                if mode == "background":
                    total.append(time.perf_counter() - tick)
        size = sum(path.stat().st_size for path in trainer.checkpoint_dir.glob("step-*.pt")) / max(
            1, len(list(trainer.checkpoint_dir.glob("step-*.pt"))))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {**{mode: statistics.median(times) for mode, times in blocked.items()},
            "background_total": statistics.median(total), "bytes": size}


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    configs = [setup.digits(objective="selfflow")]
    if not ctx.quick:
        configs.append(setup.s_size(objective="selfflow", batch_size=4))
    repeats = ctx.pick(6, 2)
    rows, targets = [], []
    for config in configs:
        ctx.log(f"[checkpoint] {config.name}: {repeats} saves per mode")
        result = measure(ctx, config, repeats)
        ratio = result["background"] / result["blocking"]
        rows.append([f"{config.name} ({config.describe().split(', ', 1)[1]})", result["bytes"] / 2**20,
                     result["blocking"] * 1e3, result["background"] * 1e3, ratio,
                     result["background_fresh"] * 1e3, result["background_fresh"] / result["blocking"],
                     result["background_total"] * 1e3])
        ctx.results.record(KEY, "blocked_background_over_blocking", ratio, "ratio", config=config.name,
                           blocking_seconds=result["blocking"], background_seconds=result["background"],
                           background_fresh_buffers_seconds=result["background_fresh"],
                           background_write_seconds=result["background_total"], file_bytes=result["bytes"],
                           repeats=repeats, statistic="median of saves")
        targets.append(Target(f"loop blocked per save, background / blocking, {config.name}", ratio, TARGET_RATIO,
                              "<=", f"{result['blocking'] * 1e3:.0f} ms -> {result['background'] * 1e3:.0f} ms",
                              absolute=f"{result['bytes'] / 2**20:.0f} MiB per checkpoint",
                              record={"item": KEY, "metric": "blocked_background_over_blocking",
                                      "config": config.name}))
    return Section(
        key=KEY,
        title="Checkpoint writes: time the training loop is blocked per save",
        command="python -m bench --only checkpoint",
        meaning=(
            "`Trainer.save_checkpoint` (model, EMA, AdamW moments, generators, data position) with "
            "`TrainConfig.checkpoint_mode = 'blocking'` (atomic write, fsync, rename, then every CRC read back, "
            "before the loop continues) and 'background' (the state copied to host memory; the same write and "
            "verification on a thread), the copy going into host buffers kept between saves "
            "(`checkpoint_host_buffers = 'reuse'`, the default) or into fresh ones ('fresh'). Medians over "
            "alternating saves. At SiT-XL/2 with EMA and AdamW a "
            "checkpoint is about 11 GB: the blocking time grows with the file, the background one with a copy "
            "in memory (a device-to-host copy on a GPU)."
        ),
        tables=[Table(["config", "MiB per checkpoint", "blocking: loop blocked ms", "background: loop blocked ms",
                       "background / blocking", "fresh buffers: loop blocked ms", "fresh buffers / blocking",
                       "background write + verify ms"], rows)],
        targets=targets,
        seconds=time.perf_counter() - started,
    )
