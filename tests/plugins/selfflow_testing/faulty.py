"""A researcher's backbone with a bug in forward: the platform must keep its type and traceback."""
from __future__ import annotations

import gin

from selfflow.components.backbones.dit import DiT


@gin.register(module="selfflow_testing")
class BuggyDiT(DiT):
    def forward(self, x, t, cond=None, **kwargs):
        return self.no_such_helper(x)  # AttributeError from user code
