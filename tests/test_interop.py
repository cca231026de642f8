import re

import jax
import numpy as np
import pytest

from tinylm_jax.core.config import ExperimentConfig
from tinylm_jax.core.model import build_model, init_params
from tinylm_jax.reference.interop import (
    IGNORED_BUFFERS,
    params_from_torch_state_dict,
    torch_state_dict_from_params,
)

torch = pytest.importorskip("torch")
from tinylm_jax.reference.torch_reference import TinyTransformerLM as TorchLM  # noqa: E402


@pytest.fixture
def cfg():
    return ExperimentConfig(vocab_size=50, seq_len=12, d_model=32, n_layers=2, n_heads=4,
                            d_ff=48)


def _torch_model(cfg):
    torch.manual_seed(0)
    model = TorchLM(cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.seq_len,
                    cfg.n_layers)
    with torch.no_grad():  # norms start at 1: perturb them so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_logits_and_attention_match_the_pytorch_model(cfg):
    reference = _torch_model(cfg)
    params = params_from_torch_state_dict(reference.state_dict(), cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch.no_grad():
        want_logits, want_attention = reference(torch.as_tensor(ids), return_attn=True)
    logits, attention = build_model(cfg).apply({"params": params}, ids, return_attention=True)
    np.testing.assert_allclose(logits, want_logits.numpy(), atol=1e-5, rtol=0)
    for got, want in zip(attention, want_attention, strict=True):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


def test_numpy_values_give_the_same_params_as_tensors(cfg):
    tensors = _torch_model(cfg).state_dict()
    from_numpy = params_from_torch_state_dict({k: v.numpy() for k, v in tensors.items()}, cfg)
    from_tensors = params_from_torch_state_dict(tensors, cfg)
    assert from_numpy["head"]["kernel"].shape == (cfg.d_model, cfg.vocab_size)
    jax.tree.map(np.testing.assert_array_equal, from_numpy, from_tensors)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("head.weight"), "missing key head.weight"),
    (lambda s: s.update({"layers.9.norm1.weight": s["norm.weight"]}),
     "unexpected key layers.9.norm1.weight"),
    (lambda s: s.update({"norm.weight": s["norm.weight"][:-1]}), "norm.weight has shape"),
])
def test_bad_state_dicts_are_refused_by_name(cfg, edit, message):
    state = dict(_torch_model(cfg).state_dict())
    edit(state)
    with pytest.raises(ValueError, match=message):
        params_from_torch_state_dict(state, cfg)


def test_torch_to_jax_to_torch_is_the_identity(cfg):
    original = _torch_model(cfg).state_dict()
    back = torch_state_dict_from_params(params_from_torch_state_dict(original, cfg), cfg)
    assert sorted(back) == sorted(original)  # buffers included: a strict load takes it
    for key, value in original.items():
        assert back[key].dtype == np.float32 and back[key].flags.c_contiguous
        if key.rsplit(".", 1)[-1] in IGNORED_BUFFERS:  # recomputed in numpy, to float rounding
            np.testing.assert_allclose(back[key], value.numpy(), atol=1e-5, rtol=0)
        else:
            np.testing.assert_array_equal(back[key], value.numpy())


@pytest.mark.parametrize("edit, message", [
    (lambda p: p.pop("head"), "missing param head/kernel"),
    (lambda p: p["layers_1"].update(extra={"bias": np.zeros(3)}),
     "unexpected param layers_1/extra/bias"),
    (lambda p: p["norm"].update(weight=np.ones(3)), "norm/weight has shape (3,), expected (32,)"),
])
def test_bad_params_are_refused_by_name(cfg, edit, message):
    params = params_from_torch_state_dict(_torch_model(cfg).state_dict(), cfg)
    edit(params)
    with pytest.raises(ValueError, match=re.escape(message)):
        torch_state_dict_from_params(params, cfg)


@pytest.mark.parametrize("grad_scale, growth_interval", [(1.0, 0), (2.0**16, 2)])
def test_optimiser_steps_match_torch_adamw_with_clipping(cfg, grad_scale, growth_interval):
    """Four steps of clipping + AdamW (torch defaults) from the same weights agree with torch.

    With a scale, torch runs the reference's GradScaler loop, clipping the scaled gradients, and the
    scale doubles after step 2, so both the replay and its growth are checked.
    """
    from tinylm_jax.core.train import create_train_state, train_step

    cfg = cfg.replace(lr=1e-2, grad_clip_norm=0.5,  # these gradients' norms are about 0.9
                      grad_scale=grad_scale, grad_scale_growth_interval=growth_interval)
    reference = _torch_model(cfg).train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=cfg.lr)  # weight decay 0.01
    scaler = torch.amp.GradScaler("cpu", init_scale=grad_scale,
                                  growth_interval=growth_interval or 2000)
    state = create_train_state(cfg, "fp32")
    state = state.replace(params=params_from_torch_state_dict(reference.state_dict(), cfg))
    start = jax.tree.map(np.array, state.params)
    rng = np.random.default_rng(1)
    norms = []
    for _ in range(4):
        ids = rng.integers(0, cfg.vocab_size, (4, cfg.seq_len + 1))
        logits = reference(torch.as_tensor(ids[:, :-1]))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                                 torch.as_tensor(ids[:, 1:]).reshape(-1))
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(),
                                                          cfg.grad_clip_norm)))
        scaler.step(optimizer)
        scaler.update()
        batch = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
                 "weights": np.ones(4, np.float32)}
        state, metrics = train_step(state, batch)
        assert float(metrics["loss_sum"] / metrics["tokens"]) == pytest.approx(loss.item(),
                                                                               rel=1e-5)
    assert min(norms) > cfg.grad_clip_norm  # clipping took part in every step
    assert scaler.get_scale() == grad_scale * (4 if growth_interval else 1)
    want = params_from_torch_state_dict(reference.state_dict(), cfg)
    moved = 0.0
    for got, expected, first in zip(jax.tree.leaves(state.params), jax.tree.leaves(want),
                                    jax.tree.leaves(start), strict=True):
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=0)
        moved = max(moved, float(np.abs(got - first).max()))
    assert moved > 1e-3  # the steps were not damped to nothing


@pytest.mark.parametrize("option", [
    {"positions": "none"}, {"positions": "rope"}, {"positions": "learned"},
    {"norm": "layernorm"}, {"qk_norm": True}, {"mlp": "swiglu"}, {"mlp": "relu2"},
    {"tie_embeddings": True}], ids=str)
def test_a_model_beyond_the_reference_is_refused_naming_the_field(cfg, option):
    cfg = cfg.replace(**option)
    params = init_params(build_model(cfg), 0)
    (field, value), = option.items()
    with pytest.raises(ValueError, match=re.escape(f"cannot represent {field} = {value!r}")):
        torch_state_dict_from_params(params, cfg)
