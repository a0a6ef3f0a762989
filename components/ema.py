"""Exponential moving average of a model: the Self-Flow teacher and the eval model."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, after every optimizer step.

    The averaged copy is initialised from the student, has requires_grad False and
    is never given to an optimizer. `updates` counts the steps (saved in checkpoints).
    `update(model, apply=flag)` takes a 0-d device tensor (1: update, 0: keep the average as it is)
    and decides on the device: nothing is read back to the host.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self._updates: int | torch.Tensor = 0

    @property
    def updates(self) -> int:
        """Optimizer steps averaged in (reads the device counter after masked updates)."""
        return int(self._updates)

    @updates.setter
    def updates(self, value: int) -> None:
        self._updates = int(value)

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA.update got a model with a different parameter list")
        # lerp(a, b, w) = a + w (b - a) = decay * a + (1 - decay) * b for w = 1 - decay; with a 0-d
        # weight tensor w * apply, a skipped step is a + 0 * (b - a) = a exactly.
        if apply is None:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)
        else:  # one 0-d weight tensor per parameter (a single tensor weight would be read to the host)
            weight = (1.0 - self.decay) * apply.to(torch.float32)
            torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer if apply is None else torch.where(apply.bool(), buffer, ema_buffer))
        self._updates = self._updates + (1 if apply is None else apply.to(torch.int64))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
