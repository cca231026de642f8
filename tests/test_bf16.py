"""Mixed precision: the custom gradients of the bf16 products and attention, the fast path's
parameters, one step against float32, and the program a GPU would run, lowered on this CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tinylm_jax.core import bf16, cpu_gemm
from tinylm_jax.core.bf16 import bf16_dense, bf16_matmul, causal_attention, transposed
from tinylm_jax.core.config import load_config
from tinylm_jax.core.model import build_model, init_params
from tinylm_jax.core.train import create_train_state, eval_step, train_step, weighted_loss
from tinylm_jax.run import products
from tinylm_jax.run.products import resolve_products

# Where the products run: XLA:CPU's canonical kernels, a GPU's plain layouts (run here on the
# CPU), and the vendor GEMM where the `cpu` extra is installed.
KERNELS = pytest.mark.parametrize("kernels", [
    "canonical", "plain",
    pytest.param("mkl", marks=pytest.mark.skipif(cpu_gemm.load() is not None,
                                                 reason=f"no vendor GEMM: {cpu_gemm.load()}"))],
    )


@pytest.mark.parametrize("shape", [(4096, 32), (96, 7), (13, 5)])  # 64-row blocks, 32, prime
def test_transposed_is_the_transpose(shape):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    np.testing.assert_array_equal(jax.jit(transposed)(x), x.T)


def _bf16_exact(key, shape):
    """Small integers times 1/8: exact in bfloat16, and their products and sums (short ones)
    exact in float32, so the bf16 path and float32 must agree to rounding of the sums alone."""
    return jax.random.randint(key, shape, -8, 9).astype(jnp.float32) / 8


@KERNELS
def test_the_custom_gradient_equals_jax_grad_of_the_plain_product(kernels):
    keys = jax.random.split(jax.random.key(0), 4)
    x, kernel, bias = (_bf16_exact(k, s) for k, s in zip(keys, [(64, 48), (48, 24), (24,)],
                                                           strict=False))
    cotangent = _bf16_exact(keys[3], (64, 24))

    def plain(x, kernel, bias):
        return jnp.sum(cotangent * (jnp.dot(x, kernel, precision="highest") + bias))

    def fast(x, kernel, bias):
        return jnp.sum(cotangent * bf16_dense(x, kernel, bias, kernels))

    expected = jax.grad(plain, argnums=(0, 1, 2))(x, kernel, bias)
    got = jax.grad(fast, argnums=(0, 1, 2))(x, kernel, bias)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_input_gradient_keeps_the_input_dtype():
    x = jnp.ones((8, 4), jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(bf16_matmul(x, jnp.ones((4, 2)), True)))(x)
    assert grad.dtype == jnp.bfloat16


def test_the_fast_path_has_the_same_parameters_as_float32(tiny_cfg):
    """Same names, shapes and initial values: checkpoints move between the two paths."""
    fast = build_model(tiny_cfg, jnp.bfloat16)
    assert fast.kernels == "canonical"  # these tests run on a CPU backend
    plain = init_params(build_model(tiny_cfg), tiny_cfg.seed)
    assert jax.tree.structure(init_params(fast, tiny_cfg.seed)) == jax.tree.structure(plain)
    for a, b in zip(jax.tree.leaves(init_params(fast, tiny_cfg.seed)), jax.tree.leaves(plain),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def _plain_attention(q, k, v, keep):
    """The model's float32 attention core, differentiated by jax: the reference."""
    scores = jnp.einsum("nqk,nsk->nqs", q, k, precision="highest")
    weights = bf16.causal_softmax(scores, q.shape[-1])
    mixing = weights if keep is None else weights * keep
    return jnp.einsum("nqs,nsk->nqk", mixing, v, precision="highest"), weights


@KERNELS
@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_the_attention_gradient_equals_jax_grad_within_bf16_rounding(kernels, dropout):
    """q, k and v are exact in bfloat16, but the weights and the gradients flowing back are
    rounded to it before each product (8 significant bits: 2^-9 relative per rounding, a few
    roundings on each path, so about 0.5%); 2% of each gradient's norm is allowed (measured
    0.26% at most). A loss that reads the weights themselves checks their cotangent's path; the
    dropout's mask (a quarter of the weights dropped, the rest scaled by 4/3) is applied to the
    weights that mix v, as the plain core applies it."""
    keys = jax.random.split(jax.random.key(1), 6)
    q, k, v = (_bf16_exact(key, (6, 16, 8)).astype(jnp.bfloat16) for key in keys[:3])
    out_weight = jax.random.normal(keys[3], (6, 16, 8))
    weights_weight = jax.random.normal(keys[4], (6, 16, 16))
    keep = (jax.random.bernoulli(keys[5], 1 - dropout, (6, 16, 16)).astype(jnp.float32)
            / (1 - dropout) if dropout else None)

    def loss(attention, q, k, v):
        out, weights = attention(q, k, v, keep)
        return jnp.sum(out * out_weight) + jnp.sum(weights * weights_weight)

    expected = jax.grad(loss, argnums=(1, 2, 3))(
        _plain_attention, *(x.astype(jnp.float32) for x in (q, k, v)))
    got = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(
        lambda q, k, v, keep: causal_attention(q, k, v, keep, kernels), q, k, v)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == jnp.bfloat16
        error = float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))
        assert error < 0.02


def _loss_and_grads(state, ids):
    def loss(params):
        logits = state.apply_fn({"params": params}, ids[:, :-1])
        loss_sum, tokens = weighted_loss(logits, ids[:, 1:], jnp.ones((ids.shape[0],)))
        return loss_sum / tokens

    # Jitted: eager, each op of the backward pass compiles on its own (about 45 s here).
    return jax.jit(jax.value_and_grad(loss))(state.params)


MKL = pytest.mark.skipif(cpu_gemm.load() is not None, reason=f"no vendor GEMM: {cpu_gemm.load()}")
PRODUCTS = pytest.mark.parametrize("products", ["xla", pytest.param("mkl", marks=MKL)])


@PRODUCTS
def test_one_fast_path_step_tracks_float32_within_bf16_rounding(tiny_cfg, products):
    """bfloat16 keeps 8 significant bits: each rounded operand is off by at most 2^-9 relative.
    A gradient here passes through a dozen or so rounded products on its way back (8 per block,
    2 blocks, the head, their backward twins); independent roundings add in quadrature, so about
    sqrt(12) * 2^-9 = 0.7% relative error is expected (measured: 0.68% at most, on layers_1's
    norm2 scale, on jax 0.10.2 and 0.12.0.1 alike), and 3% is allowed. The loss, a mean of
    logsumexp terms, moves far less (measured 1.5e-5 relative; 1e-3 allowed)."""
    ids = jax.random.randint(jax.random.key(5), (16, tiny_cfg.seq_len + 1), 0,
                             tiny_cfg.vocab_size)
    loss32, grads32 = _loss_and_grads(create_train_state(tiny_cfg, "fp32"), ids)
    loss16, grads16 = _loss_and_grads(create_train_state(tiny_cfg, "bf16", products=products),
                                      ids)
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-3)
    for path, g32 in jax.tree_util.tree_leaves_with_path(grads32):
        g16 = dict(jax.tree_util.tree_leaves_with_path(grads16))[path]
        assert g16.dtype == jnp.float32
        error = float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32))
        assert error < 0.03, (jax.tree_util.keystr(path), error)


def _batch(cfg):
    ids = jnp.zeros((cfg.batch_size, cfg.seq_len), jnp.int32)
    return {"inputs": ids, "targets": ids, "weights": jnp.ones((cfg.batch_size,), jnp.float32)}


def _names(module_text: str) -> set[str]:
    """The Python functions a lowered module's locations name."""
    return set(re.findall(r'loc\("([A-Za-z_]\w*)"', module_text))


def _lowered(step, state, batch, platform):
    return jax.export.export(step, platforms=[platform])(state, batch).mlir_module()


FAST_PATH_PIECES = {bf16.transposed.__name__}  # the real-copy transposes of the CPU's kernels


def test_the_gpu_program_is_built_for_the_gpu_on_this_cpu(tiny_cfg):
    """The train and eval steps of a state built for "cuda" lower for it here, on a CPU machine:
    none of the CPU fast path's copies, every product on bf16 operands, and the softmax and the
    loss in float32. The same state built for this CPU does hold the copies (the check can fail)."""
    batch = _batch(tiny_cfg)
    cpu = _lowered(train_step, create_train_state(tiny_cfg, "bf16", platform="cpu"), batch, "cpu")
    assert FAST_PATH_PIECES <= _names(cpu)
    state = create_train_state(tiny_cfg, "auto", platform="cuda")  # auto: bf16
    for step in (train_step, eval_step):
        gpu = _lowered(step, state, batch, "cuda")
        assert not FAST_PATH_PIECES & _names(gpu)
        products = re.findall(r"stablehlo\.dot_general [^:]*: \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                              gpu)
        assert products and all(a.endswith("xbf16>") and b.endswith("xbf16>")
                                for a, b in products), products
        # The attention softmax (over L keys) and the loss's log-softmax (over V logits) take
        # their exponentials in float32 (the GELU's, over F, are float32 today as well).
        exponentials = re.findall(r"stablehlo\.exponential \S+ : tensor<([^>]*)>", gpu)
        softmaxes = [t for t in exponentials if re.search(
            rf"x({tiny_cfg.seq_len}|{tiny_cfg.vocab_size})x[a-z]+\d+$", t)]
        assert softmaxes and all(t.endswith("xf32") for t in softmaxes), exponentials


@pytest.mark.parametrize("shape", [(2048, 128, 384), (2048, 256, 512), (2048, 512, 256),
                                   (2048, 128, 500)], ids=str)
@MKL
def test_the_vendor_gemm_equals_xlas_product_on_the_models_shapes(shape):
    """Both accumulate bf16 products in float32: equal to float32 rounding of the sums, each
    way the backward pass calls it (a transposed operand read in place)."""
    rows, inner, cols = shape
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (rows, inner)).astype(jnp.bfloat16)
    w = jax.random.normal(keys[1], (inner, cols)).astype(jnp.bfloat16)
    g = jax.random.normal(keys[2], (rows, cols)).astype(jnp.bfloat16)
    xla = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    cases = [(cpu_gemm.gemm(x, w), xla(x, w)),
             (cpu_gemm.gemm(g, w, trans_b=True), xla(g, w.T)),
             (cpu_gemm.gemm(x, g, trans_a=True), xla(x.T, g))]
    for got, want in cases:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


BIG = load_config("baseline")  # 64 GFLOP of dense products a step: enough to time


def test_auto_products_fall_back_to_xla_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "load", lambda: "MKL is not installed")
    assert resolve_products("auto", True, True, BIG) == ("xla", "MKL is not installed")
    assert resolve_products("mkl", True, True, BIG) == ("", "MKL is not installed")
    monkeypatch.setattr(cpu_gemm, "load", lambda: None)
    monkeypatch.setattr(products, "products_seconds", lambda cfg, kernels: 1 / 0)  # not timed
    assert resolve_products("auto", False, True, BIG)[0] == "xla"  # fp32
    assert resolve_products("auto", True, False, BIG)[0] == "xla"  # a GPU's program
    assert resolve_products("mkl", True, False, BIG)[0] == ""
    assert resolve_products("xla", True, True, BIG) == ("xla", "as asked")
    assert resolve_products("mkl", True, True, BIG)[0] == "mkl"  # asked for: taken


def test_auto_products_take_the_vendor_gemm_only_where_it_times_clearly_faster(monkeypatch,
                                                                                tiny_cfg):
    monkeypatch.setattr(cpu_gemm, "load", lambda: None)
    for mkl_seconds, taken in [(0.5, "mkl"), (0.95, "xla"), (2.0, "xla")]:  # XLA's: 1.0
        seconds = {"canonical": 1.0, "mkl": mkl_seconds}
        monkeypatch.setattr(products, "products_seconds",
                            lambda cfg, kernels, s=seconds: s[kernels])
        monkeypatch.setattr(products, "_choices", {})
        choice, why = resolve_products("auto", True, True, BIG)
        assert choice == taken and f"MKL's {mkl_seconds * 1e3:.0f} ms" in why
    monkeypatch.setattr(products, "products_seconds", lambda cfg, kernels: 1 / 0)
    assert resolve_products("auto", True, True, BIG)[0] == "xla"  # timed once per shapes
    choice, why = resolve_products("auto", True, True, tiny_cfg)  # too little work to time
    assert choice == "xla" and why.startswith("too few dense products")


def test_the_timing_runs_every_distinct_dense_product_of_the_model_on_the_kernels_asked(
        monkeypatch):
    calls = []
    monkeypatch.setattr(products, "product", lambda a, b, k, *t: calls.append(k) or a[:1, :1])
    assert products.products_seconds(BIG, "mkl", repeats=1) > 0
    assert calls == ["mkl"] * 3 * len(products.dense_shapes(BIG))  # traced once
