"""Functions tests run inside Ray workers (they must be importable there, not defined in a test file)."""
from __future__ import annotations

from typing import Sequence

import gin

from selfflow.platform.config import bootstrap
from selfflow.platform.config.experiment import build_from_gin
from selfflow.platform.scale.ray_train import plain_error


def rebuild_operative_config(config_str: str, overrides: Sequence[str] = ()) -> str:
    """Rebuild the experiment from the launcher's config string; gin's operative config."""
    try:
        bootstrap.parse_config_string(config_str, overrides)
        build_from_gin()
        return gin.operative_config_str()
    except Exception as error:
        raise plain_error(error) from None
