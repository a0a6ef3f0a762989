"""ImageNet-256 presets: the paper's numbers, an XL/2 forward+backward on the meta device, and
one real training step of the same presets with tiny stand-ins (width, VAE, DINOv2) on CPU.

A real SiT-XL/2 step at batch 2 needs about 10 GB (weights, EMA teacher, gradients) and tens
of seconds of CPU; here it runs on the meta device, which checks every shape and the whole
autograd graph (per-token modulation, teacher early exit at block 20, the head at block 8)
without memory. The numeric step keeps depth 28 (so blocks 8 and 20 are the real ones) and
shrinks only the width; the SD-VAE and DINOv2-B are tiny random models of the same
architecture saved locally, because real weights cannot be downloaded here.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from selfflow.components.core import Batch
from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.experiment import build_from_gin

torch.set_num_threads(1)
IMAGENET = ["imagenet/fm.gin", "imagenet/selfflow.gin", "imagenet/repa_dinov2_b.gin", "imagenet/sra.gin"]


def build_on_meta(files, params=()):
    config.parse(files, list(params))
    with torch.device("meta"):
        return build_from_gin()


@pytest.mark.filterwarnings("ignore:.*meta parameter.*:UserWarning")
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_presets_match_the_paper(name):
    from selfflow.components.samplers.sde import EulerMaruyamaSampler
    from selfflow.components.schedules.timesteps import UniformTime
    from selfflow.components.tokenizers.latents import LatentTokenizer
    from selfflow.components.tokenizers.sd_vae import SDVAETokenizer

    experiment = build_on_meta([name])
    model, tokenizer, train, sampling = experiment.model, experiment.tokenizer, experiment.train, experiment.sampling
    # SiT-XL/2 on 32x32x4 latents: 256 tokens of 16, 28 blocks of width 1152, 1000 classes.
    assert (model.hidden_dim, model.depth, model.num_classes) == (1152, 28, 1000)
    assert 670e6 < sum(p.numel() for p in model.parameters()) < 680e6  # SiT-XL/2: 675M
    assert isinstance(tokenizer, LatentTokenizer) and tokenizer.latent_shape == (4, 32, 32)
    assert tokenizer.token_shape == (256, 16) and tokenizer.grid == (16, 16)
    assert isinstance(tokenizer.decoder, SDVAETokenizer) and tokenizer.normalization.scaling_factor == 0.18215
    assert str(tokenizer.decoder.weights_dir) == str(Path("~/.cache/selfflow/sd-vae-ft-ema").expanduser())
    assert experiment.data.data_shape == (4, 32, 32) and experiment.data.num_classes == 1000
    assert (train.batch_size, train.lr, train.ema_decay, train.weight_decay, train.bf16) == (256, 1e-4, 0.9999, 0.0, True)
    assert isinstance(sampling.sampler, EulerMaruyamaSampler) and sampling.steps == 250
    assert sampling.sampler.last_step == "mean" and sampling.cfg_scale == 1.0
    objective = experiment.objective
    time_dist = objective.scheduler.time_dist if hasattr(objective, "scheduler") else objective.time_dist
    assert isinstance(time_dist, UniformTime)
    if name.endswith(("selfflow.gin", "sra.gin")):
        assert (objective.student_layer, objective.teacher_layer, objective.gamma) == (8, 20, 0.8)
        expected_mask = 0.25 if name.endswith("selfflow.gin") else 0.0
        assert objective.scheduler.mask_ratio == expected_mask
    # Every ImageNet experiment is scored by Inception FID from a local file (never downloaded).
    evaluation = experiment.evaluation
    assert type(evaluation.evaluator).__name__ == "InceptionEvaluator" and evaluation.evaluator.flavour == "fid"
    assert evaluation.evaluator.weights_path.endswith("pt_inception-2015-12-05-6726825d.pth")
    assert evaluation.num_samples == 10000
    if name.endswith("repa_dinov2_b.gin"):
        assert (objective.student_layer, objective.weight) == (8, 0.5)
        assert objective.encoder.grid == (16, 16) and objective.encoder.feature_dim == 768  # DINOv2-B/14 at 224


@pytest.mark.filterwarnings("ignore:.*meta parameter.*:UserWarning")
@pytest.mark.parametrize("name", ["imagenet/selfflow.gin"])
def test_xl2_objective_forward_backward_on_meta(name):
    # The gathered per-token modulation groups tokens with torch.unique, whose output size depends
    # on data (no meta kernel); the per-token path computes the same conditioning without it.
    experiment = build_on_meta([name], ["DiT.gathered_modulation = False"])
    model, objective = experiment.model, experiment.objective
    with torch.device("meta"):
        teacher = copy.deepcopy(model).requires_grad_(False)
        x0 = torch.empty(2, 256, 16)
        # Labels stay real (CPU): the label embedder range-checks them, which meta tensors cannot do.
        labels = torch.tensor([3, 999], device="cpu")
        terms = objective(Batch(x0=x0, cond=labels), model, teacher, torch.Generator().manual_seed(0))
        terms.total().backward()
    assert set(terms.terms) == {"flow", "rep"}
    trainable = [p for p in (*model.parameters(), *objective.parameters()) if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.shape == p.shape for p in trainable)
    assert all(p.grad is None for p in teacher.parameters())


# ----- one real step with tiny stand-ins -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd_vae(tmp_path_factory) -> Path:
    """An AutoencoderKL with SD-VAE's layout (4 blocks: /8, 4 latent channels) and 4 channels wide."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
        latent_channels=4, norm_num_groups=2, sample_size=256,
    )
    folder = tmp_path_factory.mktemp("sd_vae_tiny")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory) -> Path:
    from selfflow.platform.data.shards import write_shards

    root = tmp_path_factory.mktemp("imagenet256_latents")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        samples = ({"__key__": f"{i:06d}", "npy": (rng.standard_normal((4, 32, 32)) * 5).astype(np.float16),
                    "cls": i % 2} for i in range(4))
        write_shards(samples, root, split, 2, {"dataset": "random latents"}, num_classes=2)
    return root


def tiny_bindings(vae_dir: Path, shards: Path) -> list[str]:
    return [
        "DiT.hidden_dim = 64", "DiT.num_heads = 4",  # depth stays 28: blocks 8 and 20 are the real ones
        f"SDVAETokenizer.weights_path = '{vae_dir}'",
        f"ShardData.root = '{shards}'", "ShardData.num_classes = 2", "ShardData.shuffle_buffer = 4",
        "TrainConfig.steps = 1", "TrainConfig.batch_size = 2", "TrainConfig.eval_every = 0",
        "TrainConfig.checkpoint_every = 0", "SamplingConfig.steps = 2",
    ]


def test_selfflow_imagenet_preset_trains_one_step_with_tiny_stand_ins(tiny_sd_vae, latent_shards, tmp_path):
    from selfflow.platform.train.driver import train

    result = train(["imagenet/selfflow.gin"], tiny_bindings(tiny_sd_vae, latent_shards), run_dir=tmp_path / "run",
                   runs_dir=tmp_path / "runs", tracking=False, progress=False)
    assert result.checkpoint is not None and result.checkpoint.exists()
    losses = {k: v for k, v in result.final_metrics.items() if k.startswith("loss/")}
    assert {"loss/flow", "loss/rep", "loss/total"} <= set(losses) and all(math.isfinite(v) for v in losses.values())
    grids = list((result.run_dir / "samples").glob("*.png"))  # decoded through the (tiny) SD-VAE
    assert len(grids) == 1


def test_repa_imagenet_preset_step_with_a_tiny_dinov2(tiny_sd_vae, latent_shards, tmp_path):
    import timm
    from safetensors.torch import save_file

    shape = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    dinov2 = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, **shape)
    weights = tmp_path / "dinov2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dinov2.state_dict().items()}, str(weights))
    params = tiny_bindings(tiny_sd_vae, latent_shards) + [
        f"timm_encoder_from.weights_path = '{weights}'",
        "timm_encoder_from.model_kwargs = {'embed_dim': 32, 'depth': 2, 'num_heads': 2}",
    ]
    config.parse(["imagenet/repa_dinov2_b.gin"], params)
    experiment = build_from_gin()
    objective, model = experiment.objective, experiment.model
    assert objective.encoder.grid == (16, 16) and objective.encoder.feature_dim == 32
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)) * 5
    tokens = experiment.tokenizer.encode(latents)
    terms = objective(Batch(x0=tokens, cond=torch.tensor([0, 1])), model, None, torch.Generator().manual_seed(0))
    terms.total().backward()
    assert set(terms.terms) == {"flow", "rep"} and all(torch.isfinite(v) for v in terms.terms.values())
    assert all(p.grad is not None for p in objective.head.parameters())


def test_missing_pretrained_weights_are_one_line_errors(tmp_path):
    from selfflow.platform.config.loaders import timm_encoder_from
    from selfflow.platform.errors import UserError

    with pytest.raises(UserError, match="weights file not found") as caught:
        timm_encoder_from("vit_base_patch14_dinov2", weights_path=str(tmp_path / "absent.safetensors"))
    assert str(tmp_path / "absent.safetensors") in str(caught.value).splitlines()[0]
    config.parse(["imagenet/selfflow.gin"], [f"SDVAETokenizer.weights_path = '{tmp_path / 'no-vae'}'"])
    with pytest.raises(UserError, match="hf download stabilityai/sd-vae-ft-ema") as caught:
        build_from_gin()
    assert "\n" not in str(caught.value)
