"""Device placement, checked without a GPU.

PyTorch's meta device stands in for an accelerator: it computes shapes only and refuses any op
that mixes its tensors with CPU tensors, so code that runs on it keeps every tensor on the
model's device. `DrawGuard` adds the one rule meta does not enforce: a random draw must happen on
its generator's device (a CUDA tensor cannot be filled from a CPU generator). The meta device
holds no values, so code that reads values on the host (a finiteness check, `.cpu()` of results)
stops there; those tests assert that they got that far and failed for that reason only.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

from selfflow.components.backbones.dit import DiT
from selfflow.components.backbones.multimodal import MultiModalDiT
from selfflow.components.core import Batch, module_device
from selfflow.components.encoders.digit_encoder import DigitEncoder
from selfflow.components.metrics.probes import pooled_hidden_states
from selfflow.components.metrics.stratified import stratified_flow_loss
from selfflow.components.objectives.flow_matching import FlowMatchingObjective
from selfflow.components.objectives.repa import REPAObjective
from selfflow.components.objectives.selfflow import SelfFlowObjective, SRAObjective
from selfflow.components.samplers import (
    EulerMaruyamaSampler,
    EulerSampler,
    HeunSampler,
    time_grid,
    time_grid_with_final_jump,
)
from selfflow.components.schedules.dual import DualTimestepScheduler
from selfflow.components.schedules.timesteps import LogitNormalTime, UniformTime
from selfflow.components.tokenizers.pixels import PixelTokenizer
from selfflow.platform.config import devices
from selfflow.platform.config.experiment import SamplingConfig, TrainConfig
from selfflow.platform.errors import ConfigError
from selfflow.platform.evaluate.generation import generate
from selfflow.platform.scale.ray_train import worker_device

META = torch.device("meta")
NUM_CLASSES = 10
NO_HOST_COPY = "Cannot copy out of meta tensor"  # the first host read of a meta value


class DrawGuard(TorchFunctionMode):
    """Fails any random draw whose output device differs from its generator's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        generator = kwargs.get("generator")
        if isinstance(generator, torch.Generator):
            name = getattr(func, "__name__", str(func))
            in_place = name.endswith("_") and args and isinstance(args[0], torch.Tensor)
            target = args[0].device if in_place else torch.device(kwargs.get("device") or "cpu")
            if target.type != generator.device.type:
                raise AssertionError(f"{name} draws onto {target} from a {generator.device} generator")
        return func(*args, **kwargs)


def tiny_dit(**options) -> DiT:
    # gathered_modulation=False: the gathered path's torch.unique has no meta kernel (CUDA has one).
    torch.manual_seed(0)
    return DiT(in_dim=4, grid=(4, 4), hidden_dim=32, depth=4, num_heads=4, num_classes=NUM_CLASSES,
               gathered_modulation=False, **options)


def meta_batch() -> Batch:
    return Batch(x0=torch.randn(6, 16, 4).to(META), cond=torch.randint(0, NUM_CLASSES, (6,)).to(META))


def objectives():
    tokenizer = PixelTokenizer((1, 8, 8), patch_size=2)
    yield "flow_matching", FlowMatchingObjective(UniformTime(), num_classes=NUM_CLASSES)
    yield "selfflow", SelfFlowObjective(scheduler=DualTimestepScheduler(LogitNormalTime()), hidden_dim=32, depth=4,
                                        num_classes=NUM_CLASSES)
    yield "sra", SRAObjective(time_dist=UniformTime(), hidden_dim=32, depth=4, num_classes=NUM_CLASSES)
    yield "repa", REPAObjective(UniformTime(), DigitEncoder("small", patch_size=2, image_size=8), hidden_dim=32,
                                depth=4, num_classes=NUM_CLASSES, encoder_input=tokenizer.decode)


@pytest.mark.parametrize("name", [name for name, _ in objectives()])
def test_objective_forward_and_backward_stay_on_the_model_device(name):
    objective = dict(objectives())[name].to(META)
    model = tiny_dit().to(META)
    teacher = copy.deepcopy(model).requires_grad_(False)
    generator = torch.Generator().manual_seed(0)  # on the CPU, as the trainer's
    with DrawGuard():
        out = objective(meta_batch(), model, teacher, generator)
        out.total().backward()
    assert all(value.device == META for value in out.terms.values())
    grads = [p.grad for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    assert any(g is not None for g in grads) and all(g.device == META for g in grads if g is not None)


def test_multimodal_backbone_stays_on_the_model_device():
    torch.manual_seed(0)
    model = MultiModalDiT({"image": (4, (4, 4)), "audio": (8, (10,))}, hidden_dim=32, depth=2, num_heads=4,
                          num_classes=NUM_CLASSES, gathered_modulation=False).to(META)
    objective = SelfFlowObjective(scheduler=DualTimestepScheduler(UniformTime(), mask_ratio_by_modality={"audio": 0.5}),
                                  hidden_dim=32, depth=2, num_classes=NUM_CLASSES).to(META)
    audio = Batch(x0=torch.randn(3, 10, 8).to(META), cond=torch.tensor([1, 2, 3]).to(META), modality="audio")
    with DrawGuard():
        out = objective(audio, model, copy.deepcopy(model), torch.Generator().manual_seed(0))
    assert out.total().device == META


@pytest.mark.parametrize("sampler, grid", [(EulerSampler(), time_grid(4)), (HeunSampler(), time_grid(4)),
                                           (EulerMaruyamaSampler(), time_grid_with_final_jump(4))])
def test_samplers_integrate_on_the_noise_device_from_a_cpu_generator(sampler, grid):
    model = tiny_dit().to(META)
    labels = torch.randint(0, NUM_CLASSES, (5,)).to(META)
    with DrawGuard(), torch.no_grad():
        out = sampler(lambda x, t: model(x, t, labels).velocity, torch.randn(5, 16, 4).to(META), grid,
                      generator=torch.Generator().manual_seed(0))
    assert out.device == META and out.shape == (5, 16, 4)


@pytest.mark.parametrize("what", ["stratified_loss", "probe_features", "generate"])
def test_evaluation_moves_host_data_to_the_model_and_reads_results_back(what):
    """Data arrive on the CPU; each batch must run on the model's device and only the results come
    back. On meta the run gets exactly as far as that copy back."""
    model = tiny_dit().to(META)
    tokens = torch.randn(6, 16, 4)
    labels = torch.randint(0, NUM_CLASSES, (6,))
    generator = torch.Generator().manual_seed(0)
    runs = {
        "stratified_loss": lambda: stratified_flow_loss(model, tokens, labels, generator, num_buckets=2),
        "probe_features": lambda: pooled_hidden_states(model, tokens, 0.5, (1, 2), generator),
        "generate": lambda: generate(model, PixelTokenizer((1, 8, 8), patch_size=2),
                                     SamplingConfig(sampler=EulerMaruyamaSampler(), steps=3), labels,
                                     generator=generator),
    }
    with DrawGuard(), pytest.raises(NotImplementedError, match=NO_HOST_COPY):
        runs[what]()


def test_module_device():
    assert module_device(torch.nn.Linear(2, 2).to(META)) == META
    assert module_device(torch.nn.Identity()) == torch.device("cpu")


def test_auto_takes_a_gpu_when_torch_sees_one(monkeypatch):
    assert devices.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"'cuda:2' but this machine has 2 CUDA GPU"):
        devices.resolve_device("cuda:2")
    assert devices.resolve_device("cpu") == torch.device("cpu")


def test_bad_device_settings_fail_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match=r"TrainConfig.device 'gpu0' is not a device"):
        TrainConfig(device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"TrainConfig.device is 'cuda' but torch sees no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"the Ray workers reserve no GPU: pass --gpus-per-worker"):
        worker_device(use_gpu=False, configured="cuda")
    assert worker_device(use_gpu=False, configured="auto") == torch.device("cpu")
