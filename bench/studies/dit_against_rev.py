"""Study: does a change to components/backbones/dit.py change a DiT's outputs or step time?

    python bench/studies/dit_against_rev.py 9825f64

Loads dit.py as it was at the given git revision next to the current one, gives both the same
weights, asserts bit-identical velocities, then times forward + backward of each on the digits
DiT-tiny (batch 128, per-token t with two levels per sample, as a Self-Flow student sees it) in
interleaved pairs (order reversed every round) and prints the median ratio new / old.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def load_old_dit(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:components/backbones/dit.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "dit_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("dit_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision")
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from selfflow.components.backbones.dit import DiT

    old_module = load_old_dit(args.revision)
    settings = dict(in_dim=4, grid=(4, 4), hidden_dim=96, depth=6, num_heads=4, num_classes=10,
                    mlp_activation="gelu")
    torch.manual_seed(0)
    new = DiT(**settings)
    old = old_module.DiT(**settings)
    old.load_state_dict(new.state_dict())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, 4, generator=generator)
    levels = torch.rand(128, 2, generator=generator)
    t = torch.where(torch.rand(128, 16, generator=generator) < 0.25, levels[:, :1], levels[:, 1:])
    y = torch.randint(0, 11, (128,), generator=generator)

    def step(model) -> None:
        model.zero_grad(set_to_none=True)
        model(x, t, y, return_layers=(2,)).velocity.square().mean().backward()

    for model in (old, new):
        for _ in range(3):
            step(model)
    with torch.no_grad():
        same = torch.equal(old(x, t, y).velocity, new(x, t, y).velocity)
    if not same:
        sys.exit("dit_against_rev: the two revisions compute different velocities")
    ratios = []
    for round_ in range(args.pairs):
        seconds = {}
        for name, model in (("old", old), ("new", new)) if round_ % 2 == 0 else (("new", new), ("old", old)):
            tick = time.perf_counter()
            step(model)
            seconds[name] = time.perf_counter() - tick
        ratios.append(seconds["new"] / seconds["old"])
    low, _, high = statistics.quantiles(ratios, n=4)
    print(f"new / {args.revision} forward + backward, digits DiT-tiny, batch 128, per-token t, {args.threads} "
          f"thread(s): median {statistics.median(ratios):.3f} (quartiles {low:.3f}..{high:.3f}) over {args.pairs} "
          "interleaved pairs; velocities bit-identical")


if __name__ == "__main__":
    main()
