"""The rates of the fast path's dense products, XLA's against the vendor GEMM's, at the shapes of
the experiments' models: each product forward (x @ W), as the input's gradient (g @ W^T) and as
the weight's (x^T @ g), as `bf16.product` runs them in a training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tinylm_jax.core import cpu_gemm
from tinylm_jax.core.bf16 import product
from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.run.products import FORMS, dense_shapes
from tinylm_jax.run.timing import timed


def _rate(lhs: jax.Array, rhs: jax.Array, kernels: str, trans: tuple[bool, bool],
          repeats: int) -> float:
    """Median GFLOP/s of the product over `repeats` calls, after one."""
    call = jax.jit(lambda a, b: product(a, b, kernels, *trans))
    times = timed(lambda: jax.block_until_ready(call(lhs, rhs)), 1, repeats)
    rows, inner = (lhs.shape[1], lhs.shape[0]) if trans[0] else lhs.shape
    cols = rhs.shape[0] if trans[1] else rhs.shape[1]
    return 2 * rows * inner * cols / float(np.median(times)) / 1e9


def gemm_rates_markdown(configs: list[ExperimentConfig], rows: int, repeats: int) -> str:
    """One row per (layer shape, form): XLA's rate, and the vendor GEMM's where it loads."""
    vendor = cpu_gemm.load() is None
    kernels = ["canonical", *(["mkl"] if vendor else [])]
    header = "| Shape (rows x D -> F) | Layers | Form | XLA GFLOP/s |" + (
        " MKL GFLOP/s | MKL / XLA |" if vendor else "")
    lines = [header, "|---|---|---|---:|" + ("---:|---:|" if vendor else "")]
    shapes = dict.fromkeys((d, f, layer) for cfg in configs for layer, d, f in dense_shapes(cfg))
    key = jax.random.key(0)
    for d, f, layer in shapes:
        for form, spec in FORMS.items():
            lhs_shape, rhs_shape, *trans = spec(rows, d, f)
            key, a, b = jax.random.split(key, 3)
            lhs = jax.random.normal(a, lhs_shape).astype(jnp.bfloat16)
            rhs = jax.random.normal(b, rhs_shape).astype(jnp.bfloat16)
            rates = [_rate(lhs, rhs, k, tuple(trans), repeats) for k in kernels]
            cells = " | ".join(f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}" for rate in rates)
            ratio = f" | {rates[1] / rates[0]:.2f}x" if vendor else ""
            lines.append(f"| {rows} x {d} -> {f} | {layer} | {form} | {cells}{ratio} |")
    note = ("" if vendor else
            f"\nThe vendor GEMM is not measured: {cpu_gemm.load()}.\n")
    return "\n".join(lines) + "\n" + note
