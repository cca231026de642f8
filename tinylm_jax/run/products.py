"""Where a run's bf16 matrix products run on a CPU: XLA's own kernels or the vendor GEMM
(`cpu_gemm`), as `--products` asks.

`auto` times both on the model's own dense products, each forward and as both its gradients, and
takes the vendor GEMM only where it is clearly faster. Which one wins depends on the chip (its
AMX or AVX512-BF16 units, or neither) and on jax's version, and has gone both ways on the
machines measured (docs/performance.md), so it is measured rather than guessed from the CPU's
flags. A model whose dense products are too small to time stays on XLA's, which also keeps tiny
runs from changing their choice between processes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tinylm_jax.core import cpu_gemm
from tinylm_jax.core.bf16 import product
from tinylm_jax.core.config import ExperimentConfig, UserError
from tinylm_jax.core.model import on_cpu
from tinylm_jax.core.train import compute_dtype
from tinylm_jax.run.timing import timed

PRODUCTS = ("auto", "xla", "mkl")
# The vendor GEMM is taken only when its products take at most this share of XLA's time: a
# near tie stays on XLA's, whose elementwise neighbours fuse into its products.
MARGIN = 0.9
# A model with fewer dense-product GFLOP a step stays on XLA's unmeasured.
MIN_GFLOP = 1.0
# The timing runs on at most this many rows of each product: enough for full-speed GEMMs,
# and a few seconds of work on a slow CPU.
MAX_ROWS = 8192
REPEATS = 3

# (form, lhs shape, rhs shape, transposes) of a product of N rows with a (D, F) weight.
FORMS = {
    "forward x @ W": lambda n, d, f: ((n, d), (d, f), False, False),
    "input grad g @ W^T": lambda n, d, f: ((n, f), (d, f), False, True),
    "weight grad x^T @ g": lambda n, d, f: ((n, d), (n, f), True, False),
}


def dense_shapes(cfg: ExperimentConfig) -> list[tuple[str, int, int]]:
    """(layers, D in, F out) of every distinct dense product of the model's fast path."""
    d, f = cfg.d_model, cfg.d_ff * (2 if cfg.mlp == "swiglu" else 1)
    return [("q, k, v, out_proj", d, d), ("ff_in", d, f), ("ff_out", cfg.d_ff, d),
            ("head", d, cfg.vocab_size)]


def step_gflop(cfg: ExperimentConfig) -> float:
    """GFLOP of one training step's dense products: each layer's four projections and two
    feed-forward products and the head, each forward and as both gradients."""
    rows = cfg.batch_size * cfg.seq_len
    per_layer = {"q, k, v, out_proj": 4 * cfg.n_layers, "ff_in": cfg.n_layers,
                 "ff_out": cfg.n_layers, "head": 1}
    return sum(3 * 2 * rows * d * f * per_layer[layer] for layer, d, f in dense_shapes(cfg)) / 1e9


def products_seconds(cfg: ExperimentConfig, kernels: str, repeats: int = REPEATS) -> float:
    """The least seconds, over `repeats` calls after one, of the model's distinct dense products
    (every form, at most `MAX_ROWS` rows) on `kernels`: "canonical" (XLA's) or "mkl"."""
    rows = min(cfg.batch_size * cfg.seq_len, MAX_ROWS)
    specs = [spec(rows, d, f) for _, d, f in dense_shapes(cfg) for spec in FORMS.values()]
    operands = [(jnp.full(lhs, 0.5, jnp.bfloat16), jnp.full(rhs, 0.5, jnp.bfloat16))
                for lhs, rhs, _, _ in specs]
    transposes = [(trans_lhs, trans_rhs) for _, _, trans_lhs, trans_rhs in specs]
    call = jax.jit(lambda pairs: [product(a, b, kernels, *trans)
                                  for (a, b), trans in zip(pairs, transposes, strict=True)])
    return min(timed(lambda: jax.block_until_ready(call(operands)), 1, repeats))


# `auto`'s choices so far in this process, by the products' shapes: measured once each.
_choices: dict[tuple, tuple[str, str]] = {}


def measured_choice(cfg: ExperimentConfig) -> tuple[str, str]:
    """`auto`'s choice for a model and why, measured once per process for its products' shapes
    (the module's docstring)."""
    gflop = step_gflop(cfg)
    if gflop < MIN_GFLOP:
        return "xla", f"too few dense products to time ({gflop:.2g} GFLOP a step)"
    key = (min(cfg.batch_size * cfg.seq_len, MAX_ROWS), tuple(dense_shapes(cfg)))
    if key not in _choices:
        _choices[key] = _measure(cfg)
    return _choices[key]


def _measure(cfg: ExperimentConfig) -> tuple[str, str]:
    xla, mkl = products_seconds(cfg, "canonical"), products_seconds(cfg, "mkl")
    timing = f"MKL's {mkl * 1e3:.0f} ms against XLA's {xla * 1e3:.0f} ms for the model's products"
    if mkl <= MARGIN * xla:
        return "mkl", f"Intel MKL's bf16 GEMM through jax.ffi, measured faster: {timing}"
    return "xla", f"measured not clearly faster, {timing}"


def resolve_products(choice: str, precision_is_bf16: bool, on_cpu: bool,
                     cfg: ExperimentConfig) -> tuple[str, str]:
    """The products `cfg`'s bf16 matrices take, and why, for `--products` `choice`: "mkl" (the
    vendor GEMM: a CPU's bf16 only), "xla", or "" where `choice` cannot be had. `auto` takes the
    faster one measured here (module docstring)."""
    if choice not in PRODUCTS:
        raise ValueError(f"unknown products '{choice}'; choose one of {', '.join(PRODUCTS)}")
    if choice == "xla":
        return "xla", "as asked"
    if not (precision_is_bf16 and on_cpu):
        if choice == "mkl":
            return "", "the vendor GEMM serves bf16 products on a CPU only"
        return "xla", "bf16 on a CPU only" if on_cpu else "a GPU or TPU's own libraries"
    why_not = cpu_gemm.load()
    if why_not is not None:
        return ("", why_not) if choice == "mkl" else ("xla", why_not)
    if choice == "auto":
        return measured_choice(cfg)
    return "mkl", "Intel MKL's bf16 GEMM through jax.ffi"


def products_for(precision: str, choice: str, cfg: ExperimentConfig,
                 platform: str | None = None) -> tuple[str, str]:
    """The bf16 products `cfg`'s run takes (`resolve_products`) and why: one line. A choice that
    cannot be had is refused."""
    products, why = resolve_products(choice, compute_dtype(precision) == jnp.bfloat16,
                                     on_cpu(platform), cfg)
    if not products:
        raise UserError(f"--products {choice}: {why}")
    return products, why
