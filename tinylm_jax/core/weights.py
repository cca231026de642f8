"""A model's weights as one safetensors file: the format a published model is shared in, with its
one writer and its one reader. Keys are the flax parameter paths joined with "/"
("layers_0/attn/qkv_proj/kernel"), values float32 arrays, and the file's metadata says where the
weights came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from tinylm_jax.core.config import UserError
from tinylm_jax.core.files import write_bytes_atomic

SEPARATOR = "/"


def write_weights(path: Path, params: Any, metadata: dict[str, str]) -> None:
    """`params` (a flax parameter tree) to `path`, whole or not at all."""
    flat = traverse_util.flatten_dict(params, sep=SEPARATOR)
    arrays = {key: np.asarray(value, np.float32) for key, value in flat.items()}
    write_bytes_atomic(path, safetensors.numpy.save(arrays, metadata=metadata))


def read_weights(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The parameter tree and the metadata of a file `write_weights` wrote."""
    try:
        arrays = safetensors.numpy.load_file(str(path))
        with safetensors.safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except (OSError, safetensors.SafetensorError) as err:
        raise UserError(f"{path}: unreadable weights ({err})") from None
    return traverse_util.unflatten_dict(arrays, sep=SEPARATOR), metadata
