"""`selfflow data images`: pre-encode an image folder into latent shards with a tokenizer preset's
autoencoder (`autoencoder.tokenizer`, e.g. tokenizers/sd_vae_ema.gin)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.loaders import autoencoder
from selfflow.platform.data import DataError
from selfflow.platform.data.images import encode_image_folder
from selfflow.platform.errors import UserError


def encode_folder_from_gin(
    folder: str | os.PathLike,
    tokenizer_gin: str,
    out_dir: str | os.PathLike,
    gin_params: Sequence[str] = (),
    **options: Any,
) -> Path:
    """`selfflow data images`: the tokenizer preset's `autoencoder.tokenizer` encodes the folder."""
    config.parse([tokenizer_gin], gin_params)
    try:
        tokenizer = autoencoder()
    except UserError as error:
        raise UserError(str(error).strip().splitlines()[0]) from None
    except (TypeError, ValueError, RuntimeError, OSError) as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "autoencoder.tokenizer" in str(error) or "Required bindings" in str(error):
            text = f"{tokenizer_gin} binds no autoencoder.tokenizer (see tokenizers/sd_vae_ema.gin)"
        raise UserError(text) from None
    try:
        return encode_image_folder(folder, tokenizer, out_dir, **options)
    except (DataError, TypeError, ValueError, OSError) as error:
        raise UserError(str(error).strip().splitlines()[0]) from None
