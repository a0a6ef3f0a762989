"""Registers components with gin. Components themselves never import gin.

`gin.register` leaves the classes untouched (instances stay plain, picklable
objects of the original class); gin applies bindings only when a config
references them (`@DiT`, `@UniformTime()`).
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
    from selfflow.platform.datasource import ShardData
    from selfflow.platform.evaluation import ClassifierEvaluator, EvalSuite, InceptionEvaluator
    from selfflow.platform.experiment import SamplingConfig, TrainConfig
    from selfflow.platform.mixture import MixtureData

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
    global _REGISTERED
    if _REGISTERED:
        return
    for module, items in _families().items():
        for item in items:
            gin.register(item, module=module)
    import selfflow.platform.encoders  # noqa: F401  registers encoder training and loading
    import selfflow.platform.distributed  # noqa: F401  registers InjectedCrash (fault drills)
    import selfflow.platform.experiment  # noqa: F401  registers build_experiment
    import selfflow.platform.tokenizers  # noqa: F401  registers autoencoder training/loading, timm_encoder_from

    _REGISTERED = True
