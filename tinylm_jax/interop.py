"""Weights from the seed notebook's PyTorch `TinyTransformerLM` into this model's params.

PyTorch's `nn.Linear` stores (out, in) weights; flax's `Dense` stores (in, out) kernels, hence the
transposes. The fused QKV projection keeps the seed's (3, H, K) feature layout on both sides.
torch itself is not imported: values may be torch tensors or numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tinylm_jax.config import ExperimentConfig

# Registered buffers of the seed model: recomputed here, so ignored on import.
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


def params_from_torch_state_dict(state_dict: Mapping[str, Any], cfg: ExperimentConfig) -> dict:
    """This model's params for `cfg` from a seed-model `state_dict`.

    Raises ValueError naming every missing, unexpected or mis-shaped key.
    """
    expected = _expected(cfg)
    given = {k: v for k, v in state_dict.items() if k.rsplit(".", 1)[-1] not in IGNORED_BUFFERS}
    problems = [f"missing key {k}" for k in expected if k not in given]
    problems += [f"unexpected key {k}" for k in given if k not in expected]
    arrays = {k: _to_numpy(v) for k, v in given.items() if k in expected}
    problems += [f"{k} has shape {arrays[k].shape}, expected {expected[k][1]}"
                 for k in arrays if arrays[k].shape != expected[k][1]]
    if problems:
        raise ValueError("state_dict does not match the config: " + "; ".join(problems))
    params: dict = {}
    for key, (path, _, transpose) in expected.items():
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = arrays[key].T if transpose else arrays[key]
    return params
