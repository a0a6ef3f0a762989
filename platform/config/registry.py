"""The configurables gin knows out of the box: the components and the platform's own settings.

Components never import gin, so they are registered here with `gin.register`, which leaves the
classes untouched (instances stay plain, picklable objects of the original class); gin applies
bindings only when a config references them (`@DiT`, `@UniformTime()`). The platform's own gin
functions (build_experiment, the weight loaders) register where they are defined, when this
module imports them.

A researcher's own components register in their own module (`@gin.register`) and a gin file
imports that module (`import my_lab.objectives`): docs/extending.md.
"""
from __future__ import annotations

import gin

_REGISTERED = False


def _families() -> dict[str, list]:
    from selfflow.components.backbones.dit import DiT
    from selfflow.components.backbones.multimodal import MultiModalDiT
    from selfflow.components.encoders.digit_encoder import DigitEncoder
    from selfflow.components.encoders.timm_encoder import TimmEncoder
    from selfflow.components.objectives.flow_matching import FlowMatchingObjective
    from selfflow.components.objectives.repa import REPAObjective
    from selfflow.components.objectives.selfflow import SelfFlowObjective, SRAObjective
    from selfflow.components.samplers.ode import EulerSampler, HeunSampler
    from selfflow.components.samplers.sde import EulerMaruyamaSampler
    from selfflow.components.schedules.dual import DualTimestepScheduler
    from selfflow.components.schedules.timesteps import LogitNormalTime, ShiftedTime, UniformTime
    from selfflow.components.tokenizers.conv_ae import ConvAETokenizer
    from selfflow.components.tokenizers.encodec import EncodecTokenizer
    from selfflow.components.tokenizers.latents import LatentTokenizer
    from selfflow.components.tokenizers.pixels import PixelTokenizer
    from selfflow.components.tokenizers.sd_vae import SDVAETokenizer
    from selfflow.platform.config.experiment import TrainConfig
    from selfflow.platform.data.mixture import MixtureData
    from selfflow.platform.data.sources import ShardData
    from selfflow.platform.evaluate.evaluators import ClassifierEvaluator, InceptionEvaluator
    from selfflow.platform.evaluate.generation import SamplingConfig
    from selfflow.platform.evaluate.suite import EvalSuite

    return {
        "backbones": [DiT, MultiModalDiT],
        "tokenizers": [PixelTokenizer, SDVAETokenizer, LatentTokenizer, ConvAETokenizer, EncodecTokenizer],
        "schedules": [UniformTime, LogitNormalTime, ShiftedTime, DualTimestepScheduler],
        "objectives": [FlowMatchingObjective, SelfFlowObjective, SRAObjective, REPAObjective],
        "encoders": [TimmEncoder, DigitEncoder],
        "samplers": [EulerSampler, HeunSampler, EulerMaruyamaSampler],
        "selfflow": [TrainConfig, SamplingConfig, ShardData, MixtureData],
        "evaluation": [EvalSuite, ClassifierEvaluator, InceptionEvaluator],
    }


def register_all() -> None:
    """Register every built-in configurable (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    for module, items in _families().items():
        for item in items:
            gin.register(item, module=module)
    import selfflow.platform.config.experiment  # noqa: F401  build_experiment
    import selfflow.platform.config.loaders  # noqa: F401  conv_ae_from, autoencoder, digit_encoder_from, timm_encoder_from
    import selfflow.platform.config.tracking  # noqa: F401  RunTracking

    _REGISTERED = True
