"""Study: how far does a bfloat16 teacher move Self-Flow's alignment target?
(SelfFlowObjective.teacher_precision; numbers quoted in its docstring, the README and the issue 6 notes.)

    python bench/studies/teacher_precision.py                 # the bench's trained digits model
    python bench/studies/teacher_precision.py --run runs/x    # any digits Self-Flow run folder

On the digits test split, each image noised to the teacher level the objective would draw (t, s ~ p(t),
teacher at min(t, s)), it runs the run's EMA backbone up to the teacher block twice: in float32 and
under bfloat16 autocast, as `teacher_precision = 'bfloat16'` does. It prints the relative error of
the block's features and 1 - cos per token, the quantity the alignment loss is made of.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.core import DEFAULT_CACHE


def bench_model_dir(cache: Path) -> Path:
    from bench import sampling as bench_sampling

    return bench_sampling.model_run(SimpleNamespace(cache_dir=cache), bench_sampling.MODEL_STEPS)[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder (default: make bench's trained digits model)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from selfflow.components.datasets.digits import load_digits_split
    from selfflow.platform.train.saved import load_for_sampling

    run_dir = args.run or bench_model_dir(args.cache)
    if not (run_dir / "config.gin").is_file():
        sys.exit(f"teacher_precision: no trained run in {run_dir} (run `make bench` first, or pass --run)")
    experiment, model, step = load_for_sampling(run_dir, overrides=["TrainConfig.device = 'cpu'"])
    objective = experiment.objective
    if not hasattr(objective, "teacher_layer") or not hasattr(objective, "scheduler"):
        sys.exit(f"teacher_precision: {run_dir} does not train a Self-Flow objective "
                 f"({type(objective).__name__})")
    images, labels = load_digits_split("test")
    x0 = experiment.tokenizer.encode(torch.from_numpy(images))
    generator = torch.Generator().manual_seed(args.seed)
    draws = objective.scheduler.sample(x0.shape[0], x0.shape[1], generator)
    eps = torch.randn(x0.shape, generator=generator)
    level = draws.teacher_t
    noisy = objective.path.interpolate(x0, eps, level)
    cond = torch.from_numpy(labels)
    k = objective.teacher_layer

    def features(lowered: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=lowered):
            return model(noisy, level, cond, return_layers=(k,), stop_at=k).hidden[k].float()

    exact, rounded = features(False), features(True)
    gap = 1 - torch.nn.functional.cosine_similarity(exact, rounded, dim=-1)
    relative = (exact - rounded).norm() / exact.norm()
    print(f"{run_dir} (step {step}), teacher block {k}, {gap.numel()} tokens of {x0.shape[0]} test digits:")
    print(f"  relative error of the features {relative:.2e}; 1 - cos per token: mean {gap.mean():.2e}, "
          f"max {gap.max():.2e}")


if __name__ == "__main__":
    main()
