"""The decorator the platform's own gin functions and classes register with."""
from __future__ import annotations

import gin


def configurable(name: str | None = None, *, module: str):
    """@configurable(module=...): gin.configurable for the platform's own gin functions and classes,
    also when imported after an earlier parse locked gin's registry (tests, notebooks)."""

    def wrap(target):
        with gin.unlock_config():
            return gin.configurable(name, module=module)(target)

    return wrap
