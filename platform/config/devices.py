"""Where training and sampling run: `TrainConfig.device` resolved to a torch.device.

'auto' takes the first CUDA GPU when one is visible, else the CPU. Under Ray Train the worker's
device comes from Ray instead (platform/distributed.py), so `--gpus-per-worker` decides.
Random draws stay on the CPU generator whatever the device (see Trainer): a GPU run draws the
same noise, levels and masks as a CPU run with the same seed.
"""
from __future__ import annotations

import torch

from selfflow.platform.errors import ConfigError

AUTO = "auto"


def parse_device(name: str) -> torch.device | None:
    """The device `name` names (None for 'auto'); a ConfigError naming the value if it is not one."""
    if name == AUTO:
        return None
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"TrainConfig.device {name!r} is not a device ('auto', 'cpu', 'cuda', 'cuda:1', ...): "
                          f"{reason}") from None


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; an explicit device must exist on this machine."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"TrainConfig.device is {name!r} but torch sees no CUDA GPU on this machine "
                              f"(torch {torch.__version__}); use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"TrainConfig.device is {name!r} but this machine has "
                              f"{torch.cuda.device_count()} CUDA GPU(s)")
    return device

