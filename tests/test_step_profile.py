"""The step profile finds every matrix product of the compiled step and names each part."""

import jax
import pytest
from conftest import refused, tiny_config

from tinylm_jax.bench.step_profile import model_part, profile_step
from tinylm_jax.cli.bench import profile_main
from tinylm_jax.core.model import build_model, init_params


def test_the_products_found_carry_every_training_flop_of_the_step():
    """Training a dense kernel costs 6 FLOPs per parameter per token (forward, and the two
    gradient products), and causal attention as computed 12 * L * D per token per layer (QK^T
    and AV, forward and two gradients each): the products parsed from the optimised module, with
    their contracted sizes, must add up to exactly that, so none was missed or miscounted."""
    cfg = tiny_config()
    profile = profile_step(cfg, "bf16", steps=1)  # the fast path: the products split by hand
    params = jax.eval_shape(lambda: init_params(build_model(cfg), 0))
    kernels = sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                  if path[-1].key == "kernel")
    tokens = cfg.batch_size * cfg.seq_len
    expected = (6 * kernels + 12 * cfg.n_layers * cfg.seq_len * cfg.d_model) * tokens
    products = [t for t in profile.timed if t.instruction.product is not None]
    assert sum(t.instruction.product.flops for t in products) == expected
    assert {t.instruction.part for t in products} == {
        "head", "block/attn", "block/attn/qkv_proj", "block/attn/out_proj", "block/ff_in",
        "block/ff_out"}
    assert all(t.seconds > 0 for t in profile.timed) and profile.wall_s > 0


@pytest.mark.parametrize(("op_name", "part_and_phase"), [
    ("jit(_train_step)/jvp(TinyTransformerLM)/layers_0/ff_in/dot_general",
     ("block/ff_in", "forward")),
    ("jit(_train_step)/transpose(jvp(TinyTransformerLM))/layers_1/attn/"
     "bhqk,bhsk->bhqs/dot_general", ("block/attn", "backward")),
    ("jit(_train_step)/jvp(TinyTransformerLM)/head/dot_general", ("head", "forward")),
    ("jit(_train_step)/jvp(TinyTransformerLM)/add", ("embedding and positions", "forward")),
    ("jit(_train_step)/transpose(jvp())/reduce_sum", ("loss", "backward")),
    ("jit(_train_step)/integer_pow", ("optimiser", "update")),
    ("", ("(unnamed by XLA)", "forward")),
])
def test_op_names_map_to_model_parts_and_phases(op_name, part_and_phase):
    assert model_part(op_name) == part_and_phase


def test_the_command_writes_its_report_and_refuses_bad_flags(tiny_toml, tmp_path, capsys):
    out = tmp_path / "profile.md"
    assert profile_main([str(tiny_toml), "--precision", "bf16", "--steps", "1",
                         "--out", str(out)]) == 0
    report = out.read_text(encoding="utf-8")
    assert report in capsys.readouterr().out
    for heading in ("## tiny, bfloat16", "| Part (blocks summed) |", "| Product | Part |"):
        assert heading in report
    assert "--steps must be positive" in refused(profile_main, ["baseline", "--steps", "0"],
                                                 capsys)
