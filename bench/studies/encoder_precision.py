"""Study: REPA's frozen encoder in float32 against bfloat16 (REPAObjective.encoder_precision).

    python bench/studies/encoder_precision.py [--model vit_base_patch14_dinov2] [--batch 4] [--rounds 8]

Times `REPAObjective.target_features`, the code a training step runs, with each precision, on
images of the encoder's size (DINOv2-B/14 at 224: a 16 x 16 grid, the S config's token grid), in
interleaved rounds (the order reverses every round), and prints the median of the paired ratios.
It also prints how far the rounded features are from the float32 ones.

Pretrained weights cannot be downloaded here, so the encoder is the real architecture with its
random initialisation, saved to a file and loaded through TimmEncoder's own loading path: the
timing holds for the real weights, the feature gap is indicative only.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from selfflow.platform import host

host.apply_before_torch("cpu_shared")  # as the bench does (platform/host.py)


def build_encoder(model_name: str, image_size: int, folder: Path):
    import timm
    from safetensors.torch import save_file

    from selfflow.components.encoders.timm_encoder import TimmEncoder

    weights = folder / "random_init.safetensors"
    model = timm.create_model(model_name, pretrained=False, num_classes=0, img_size=image_size)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(weights))
    return TimmEncoder(model_name, weights_path=str(weights), image_size=image_size)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch14_dinov2")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=4, help="images per step (the S config's batch: 4)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 2:
        parser.error(f"--batch must be >= 1 and --rounds >= 2, got {args.batch} and {args.rounds}")

    from selfflow.components.objectives.repa import REPAObjective
    from selfflow.components.schedules.timesteps import UniformTime

    with tempfile.TemporaryDirectory() as folder:
        encoder = build_encoder(args.model, args.image_size, Path(folder))
    side = args.image_size
    images = torch.rand(args.batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    tokens = images.reshape(args.batch, -1, 1)  # what the objective holds; encoder_input maps it back

    def objective(precision: str) -> REPAObjective:
        return REPAObjective(UniformTime(), encoder, hidden_dim=384, depth=12, encoder_precision=precision,
                             encoder_input=lambda x: x.reshape(args.batch, 3, side, side), grid=tuple(encoder.grid))

    variants = {name: objective(name) for name in ("float32", "bfloat16")}
    features = {name: variant.target_features(tokens, tuple(encoder.grid)) for name, variant in variants.items()}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(args.rounds):
        order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in order:
            started = time.perf_counter()
            variants[name].target_features(tokens, tuple(encoder.grid))
            seconds[name].append(time.perf_counter() - started)
    ratios = [low / full for low, full in zip(seconds["bfloat16"], seconds["float32"])]
    exact, rounded = features["float32"], features["bfloat16"]
    gap = 1 - torch.nn.functional.cosine_similarity(exact, rounded, dim=-1)
    print(f"{args.model} at {side} px (grid {tuple(encoder.grid)}, {encoder.feature_dim} features), batch "
          f"{args.batch}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds:")
    for name in variants:
        print(f"  {name}: median {statistics.median(seconds[name]) * 1e3:.0f} ms")
    print(f"  bfloat16 / float32: {statistics.median(ratios):.3f} (median of paired ratios)")
    print(f"  random weights: relative error of the features {(exact - rounded).norm() / exact.norm():.2e}; "
          f"1 - cos per token: mean {gap.mean():.2e}, max {gap.max():.2e}")


if __name__ == "__main__":
    main()
