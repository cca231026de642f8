"""Weights between the reference notebook's PyTorch `TinyTransformerLM` and this model's params.

PyTorch's `nn.Linear` stores (out, in) weights; flax's `Dense` stores (in, out) kernels, hence the
transposes. The fused QKV projection keeps the reference's (3, H, K) feature layout on both sides.
One table maps the keys both ways. torch itself is not imported: values may be torch tensors or
numpy arrays, and exports are safetensors files written with its numpy API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from flax import traverse_util

from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.files import write_bytes_atomic
from tinylm_jax.core.model import sinusoidal_positions

# Registered buffers of the reference model: recomputed here, so ignored on import.
IGNORED_BUFFERS = ("pos_encoding", "causal_mask")


def _to_numpy(value: Any) -> np.ndarray:
    """A float32 copy: a view would let later in-place updates of the tensor leak into params."""
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.array(value, dtype=np.float32, copy=True)


def _expected(cfg: ExperimentConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """torch key -> (flax param path, torch shape, transpose?)."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
    table = {"token_embedding.weight": (("token_embedding", "embedding"), (v, d), False),
             "norm.weight": (("norm", "weight"), (d,), False),
             "head.weight": (("head", "kernel"), (v, d), True)}
    for i in range(cfg.n_layers):
        t, j = f"layers.{i}.", f"layers_{i}"
        table.update({
            t + "attn.qkv_proj.weight": ((j, "attn", "qkv_proj", "kernel"), (3 * d, d), True),
            t + "attn.out_proj.weight": ((j, "attn", "out_proj", "kernel"), (d, d), True),
            t + "norm1.weight": ((j, "norm1", "weight"), (d,), False),
            t + "norm2.weight": ((j, "norm2", "weight"), (d,), False),
            t + "ff.0.weight": ((j, "ff_in", "kernel"), (f, d), True),
            t + "ff.0.bias": ((j, "ff_in", "bias"), (f,), False),
            t + "ff.2.weight": ((j, "ff_out", "kernel"), (d, f), True),
            t + "ff.2.bias": ((j, "ff_out", "bias"), (d,), False),
        })
    return table


def check_representable(cfg: ExperimentConfig) -> None:
    """Refuse (ValueError) a config the reference's PyTorch model cannot be, naming its fields."""
    if beyond := cfg.beyond_reference():
        raise ValueError(f"the reference's PyTorch model cannot represent {', '.join(beyond)}")


def _mismatches(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, Any], what: str
                ) -> list[str]:
    """Every missing, unexpected or mis-shaped entry of `given`, named."""
    problems = [f"missing {what} {k}" for k in expected if k not in given]
    problems += [f"unexpected {what} {k}" for k in given if k not in expected]
    problems += [f"{k} has shape {tuple(given[k].shape)}, expected {expected[k]}"
                 for k in expected if k in given and tuple(given[k].shape) != expected[k]]
    return problems


def params_from_torch_state_dict(state_dict: Mapping[str, Any], cfg: ExperimentConfig) -> dict:
    """This model's params for `cfg` from a reference-model `state_dict`.

    Raises ValueError naming every missing, unexpected or mis-shaped key, or the fields of a
    config the reference's model cannot be (`beyond_reference`).
    """
    check_representable(cfg)
    expected = _expected(cfg)
    given = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in IGNORED_BUFFERS}
    problems = _mismatches({k: shape for k, (_, shape, _) in expected.items()}, given, "key")
    if problems:
        raise ValueError("state_dict does not match the config: " + "; ".join(problems))
    params: dict = {}
    for key, (path, _, transpose) in expected.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        array = _to_numpy(given[key])
        node[path[-1]] = array.T if transpose else array
    return params


def reference_buffers(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """The reference model's registered buffers, as it builds them: the (1, L, D) sinusoidal table
    and each block's (L, L) causal mask, ones on and below the diagonal."""
    buffers = {"pos_encoding": sinusoidal_positions(cfg.seq_len, cfg.d_model)[None]}
    buffers.update({f"layers.{i}.causal_mask": np.tril(np.ones((cfg.seq_len, cfg.seq_len),
                                                               np.float32))
                    for i in range(cfg.n_layers)})
    return buffers


def torch_state_dict_from_params(params: Mapping[str, Any], cfg: ExperimentConfig
                                 ) -> dict[str, np.ndarray]:
    """The reference model's `state_dict` for this model's `params`, as float32 numpy arrays: the
    exact inverse of `params_from_torch_state_dict`, plus the reference's buffers, so that the
    reference's `load_state_dict` (strict) takes it as it is.

    Raises ValueError naming every missing, unexpected or mis-shaped param ("layers_0/ff_in/bias"),
    and for a model the reference's cannot be, naming the fields (`beyond_reference`).
    """
    check_representable(cfg)
    expected = _expected(cfg)
    given = {"/".join(path): value for path, value in traverse_util.flatten_dict(params).items()}
    shapes = {"/".join(path): shape[::-1] if transpose else shape
              for path, shape, transpose in expected.values()}
    problems = _mismatches(shapes, given, "param")
    if problems:
        raise ValueError("params do not match the config: " + "; ".join(problems))
    state = {}
    for key, (path, _, transpose) in expected.items():
        array = _to_numpy(given["/".join(path)])
        state[key] = np.ascontiguousarray(array.T) if transpose else array
    return {**state, **reference_buffers(cfg)}


def save_torch_weights(params: Mapping[str, Any], cfg: ExperimentConfig, path: Path,
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write `torch_state_dict_from_params` as a safetensors file, whole or not at all.

    The file's metadata holds the config (to build the reference model with) and `metadata`. Its
    folder is created only once the weights have converted: a refusal writes nothing.
    """
    state = torch_state_dict_from_params(params, cfg)
    record = {"format": "pt", "config": json.dumps(cfg.to_dict()), **(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, safetensors.numpy.save(state, metadata=record))
    return path
