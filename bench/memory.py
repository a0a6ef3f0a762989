"""Item 6, memory: peak resident memory per config and batch size, and how it grows.

Each (config, batch) runs in a fresh Python process (peak RSS only ever grows within a
process): it imports the platform, builds the Trainer (model, EMA copy, AdamW), runs a
few Self-Flow training steps and reports its RSS after import, after building, and its
peak (VmHWM). Growth is fitted as a line in the batch size (MiB per sample) for each
config, and across model sizes at a fixed batch (MiB per million parameters).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Sequence

from bench import workloads as setup
from bench.core import BenchContext, Section, Table, fit_line

KEY = "memory"
STEPS = 2


def child(config_json: str, scratch: str) -> dict:
    """Runs inside the fresh process: import -> build -> train STEPS steps; RSS at each stage."""
    from bench.core import current_rss_mb, peak_rss_mb
    from selfflow.platform.config import bootstrap as gin_config

    fields = json.loads(config_json)
    fields["data_shape"] = tuple(fields["data_shape"])
    fields["extra"] = tuple(fields["extra"])
    config = setup.BenchConfig(**fields)
    gin_config.parse(config.gin_files(), config.gin_params())  # imports every registered module, builds nothing
    imported = current_rss_mb()
    trainer = setup.build_trainer(config, scratch=scratch)
    built = current_rss_mb()
    raw = setup.synthetic_batch(config)
    for _ in range(STEPS):
        trainer.train_step(raw)
    return {"imported_mb": imported, "built_mb": built, "peak_mb": peak_rss_mb(),
            "parameters": setup.parameter_count(trainer.module)}


def measure(config: setup.BenchConfig, scratch: str, threads: int) -> dict:
    code = ("import json, sys, torch; torch.set_num_threads(%d); "
            "from bench.memory import child; "
            "print('RESULT ' + json.dumps(child(sys.argv[1], sys.argv[2])))" % threads)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(config)), scratch],
                          capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory child for {config.describe()} failed: {tail}")
    return json.loads(lines[-1][len("RESULT "):])


def run(ctx: BenchContext) -> Section:
    import torch

    started = time.perf_counter()
    threads = torch.get_num_threads()
    scratch = str(ctx.cache_dir / "scratch")
    batch_sweeps: list[tuple[setup.BenchConfig, Sequence[int]]] = [
        (setup.digits(objective="selfflow"), ctx.pick([32, 128, 512], [32, 128])),
    ]
    if not ctx.quick:
        batch_sweeps.append((setup.s_size(objective="selfflow"), [2, 8]))
    size_sweep = [setup.digits(objective="selfflow", batch_size=32, size=size) for size in ctx.pick(("S", "B"), ())]
    rows, measured = [], {}
    for base, batches in batch_sweeps:
        for batch in batches:
            config = base.with_(batch_size=batch)
            ctx.log(f"[memory] {config.describe()}")
            measured[config] = measure(config, scratch, threads)
    for config in size_sweep:
        ctx.log(f"[memory] {config.describe()}")
        measured[config] = measure(config, scratch, threads)
    for config, m in measured.items():
        rows.append([config.describe(), m["parameters"] / 1e6, m["imported_mb"], m["built_mb"], m["peak_mb"],
                     m["peak_mb"] - m["built_mb"]])
        ctx.results.record(KEY, "peak_rss_mb", m["peak_mb"], "MiB", config=config.name, size=config.size,
                           batch_size=config.batch_size, tokens=config.num_tokens, describe=config.describe(),
                           **{k: v for k, v in m.items() if k != "peak_mb"})
    growth_rows = []
    for base, batches in batch_sweeps:
        points = [(b, measured[base.with_(batch_size=b)]) for b in batches]
        if len(points) >= 2:
            slope, intercept = fit_line([b for b, _ in points], [m["peak_mb"] for _, m in points])
            per_token = slope / base.num_tokens
            growth_rows.append([f"{base.name} (DiT-{base.size}, {base.num_tokens} tokens): vs batch",
                                f"{slope:.2f} MiB per sample ({per_token * 1024:.0f} KiB per token)",
                                f"{intercept:.0f} MiB at batch 0"])
            ctx.results.record(KEY, "mib_per_sample", slope, "MiB", config=base.name, intercept_mb=intercept,
                               kib_per_token=per_token * 1024)
    same_batch = [(c, m) for c, m in measured.items() if c.name == "digits" and c.batch_size == 32]
    if len(same_batch) >= 2:
        slope, intercept = fit_line([m["parameters"] / 1e6 for _, m in same_batch],
                                    [m["peak_mb"] for _, m in same_batch])
        growth_rows.append(["digits tokens, batch 32: vs model size",
                            f"{slope:.1f} MiB per million parameters ({slope * 2**20 / 1e6:.1f} bytes/parameter)",
                            f"{intercept:.0f} MiB at 0 parameters"])
        ctx.results.record(KEY, "mib_per_million_parameters", slope, "MiB", intercept_mb=intercept)
    tables = [
        Table(["config (Self-Flow step)", "parameters (M)", "RSS after import MiB", "after build MiB",
               "peak MiB", "peak - built MiB"], rows),
        Table(["growth", "slope", "intercept"], growth_rows, title="Fitted growth (least squares on peak RSS)"),
    ]
    return Section(
        key=KEY,
        title="Memory: peak RSS per config and batch size",
        command="python -m bench --only memory",
        meaning=(
            f"Each row is a fresh process: import the platform, build the Trainer (backbone, EMA teacher copy, "
            f"AdamW, projector head), run {STEPS} Self-Flow steps on a synthetic batch; RSS is read from "
            "/proc/self/status (VmRSS after import and after build, VmHWM for the peak). \"peak - built\" is "
            "what the step itself needs: activations kept for backward, gradients, AdamW moments (allocated "
            "at the first step) and allocator slack. Per-sample growth is the slope of a least-squares line "
            "through the batch sweep; the parameter cost is the slope across model sizes at batch 32 "
            "(weights, gradients, two AdamW moments and the EMA copy: about 20 bytes per parameter before "
            "activations)."
        ),
        tables=tables,
        seconds=time.perf_counter() - started,
    )
