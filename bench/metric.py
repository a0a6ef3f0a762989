"""How noisy is the Fréchet distance? Its spread across sampling seeds versus the sample count N.

For each N, one trained model generates N samples with S different noise seeds and
each set is scored against the test split (the evaluator of the experiment's
EvalSuite). The same is done with N real train images (S random subsets): the
floor a perfect generator would reach, and its own noise. Two runs evaluated with
independent seeds differ by noise alone with standard deviation sqrt(2) * std, so
a difference below about 2.8 * std (two sigma of that) does not separate them.
The trainer's periodic evaluation uses one fixed seed for every run (common
random numbers), which makes run-to-run differences less noisy than this.

    python -m bench.metric                      # trains a short digits run first
    python -m bench.metric --run-dir runs/digits_fm --sizes 100,500 --seeds 3
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

SEPARATION_FACTOR = 2 * math.sqrt(2)  # two sigma of the difference of two independent estimates


@dataclass
class SpreadRow:
    num_samples: int
    model_fd: list[float]
    real_fd: list[float]

    @staticmethod
    def _std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    @property
    def model_std(self) -> float:
        return self._std(self.model_fd)

    @property
    def real_std(self) -> float:
        return self._std(self.real_fd)

    @property
    def resolvable_difference(self) -> float:
        return SEPARATION_FACTOR * self.model_std


def train_short_run(folder: Path, steps: int, threads: int = 1) -> Path:
    """A short digits flow-matching run (no tracking, no periodic evaluation) to measure with."""
    from selfflow.platform.data.shards import build_digits_shards
    from selfflow.platform.train.driver import train

    data = folder / "data" / "digits"
    build_digits_shards(data, seed=0)
    result = train(
        ["digits/fm.gin"],
        [f"TrainConfig.steps = {steps}", f"TrainConfig.num_threads = {threads}", "TrainConfig.eval_every = 0",
         "TrainConfig.checkpoint_every = 0",
         f"ShardData.root = '{data}'", "build_experiment.evaluation = None"],
        run_dir=folder / "runs" / "bench_metric", runs_dir=folder / "runs", tracking=False, progress=False,
    )
    return result.run_dir


def measure_spread(run_dir: Path, sizes: Sequence[int], seeds: int, overrides: Sequence[str] = (),
                   cache_dir: str | None = None) -> list[SpreadRow]:
    """FD of generated and of real sets, for every N in `sizes` and `seeds` seeds each.

    cache_dir: where the evaluator is cached (default: the run's EvalSuite setting)."""
    from selfflow.components.metrics.evaluator import batched_outputs
    from selfflow.platform.evaluate.suite import EvalSuite
    from selfflow.platform.train.saved import load_for_sampling

    experiment, model, _ = load_for_sampling(run_dir, None, overrides)
    suite = experiment.evaluation if isinstance(experiment.evaluation, EvalSuite) else EvalSuite()
    if cache_dir is not None:
        suite.cache_dir = str(cache_dir)
    context = suite.prepare(experiment, run_dir)
    network, train_images = context.evaluator.network, context.data.train_images
    largest = max(sizes)
    rows = {size: SpreadRow(size, [], []) for size in sizes}
    for index in range(seeds):
        seed = suite.sample_seed + index
        # One set of the largest size per seed; smaller N use its prefixes (labels stay test-like).
        images, _ = suite.generate_samples(experiment, model, context, largest, seed)
        features, _ = batched_outputs(network, images)
        generator = torch.Generator().manual_seed(seed)
        for size in sizes:
            rows[size].model_fd.append(context.reference(features[:size]))
            if size <= train_images.shape[0]:
                pick = torch.randperm(train_images.shape[0], generator=generator)[:size]
            else:
                pick = torch.randint(train_images.shape[0], (size,), generator=generator)
            real_features, _ = batched_outputs(network, train_images[pick])
            rows[size].real_fd.append(context.reference(real_features))
    return [rows[size] for size in sizes]


def format_table(rows: Sequence[SpreadRow], seeds: int) -> str:
    lines = [
        f"| N | FD of samples: mean ± std over {seeds} seeds (min..max) | FD of N real train images: mean ± std "
        f"| smallest FD difference two runs can show (2.8 std) |",
        "|---:|---|---|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.num_samples} | {statistics.mean(row.model_fd):.3f} ± {row.model_std:.3f} "
            f"({min(row.model_fd):.3f}..{max(row.model_fd):.3f}) "
            f"| {statistics.mean(row.real_fd):.3f} ± {row.real_std:.3f} | {row.resolvable_difference:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metric",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default=None, help="a trained run (default: train a short digits run first)")
    parser.add_argument("--steps", type=int, default=400, help="training steps of that short run")
    parser.add_argument("--sizes", default="100,200,500,1000", help="sample counts N, comma-separated")
    parser.add_argument("--seeds", type=int, default=5, help="sampling seeds per N")
    parser.add_argument("--gin_param", "--gin-param", action="append", default=[],
                        help="overrides, e.g. SamplingConfig.steps=8")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: extra threads mostly spin on a shared 2-core machine)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 3 seeds (a smoke run)")
    args = parser.parse_args(argv)
    sizes = [100, 200] if args.quick else sorted({int(size) for size in args.sizes.split(",")})
    seeds = 3 if args.quick else args.seeds
    if seeds < 2 or not sizes or min(sizes) < 2:
        parser.error("need --seeds >= 2 and sizes >= 2")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_metric-") as temp:
        steps = 150 if args.quick else args.steps
        run_dir = Path(args.run_dir) if args.run_dir else train_short_run(Path(temp), steps, args.threads)
        # A throw-away run keeps its evaluator in ./runs/.cache like every other digits run.
        cache_dir = None if args.run_dir else str(Path("runs/.cache/evaluators").resolve())
        rows = measure_spread(run_dir, sizes, seeds, args.gin_param, cache_dir)
    print(f"Fréchet distance spread across sampling seeds (run: {args.run_dir or 'short digits FM run'})")
    print(format_table(rows, seeds))
    print(f"(measured in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
