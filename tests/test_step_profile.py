"""The step profile finds every matrix product of the compiled step and names each part."""

import jax
import pytest
from conftest import refused, tiny_config

from tinylm_jax.bench.step_profile import model_part, parse_module, profile_step
from tinylm_jax.cli.bench import profile_main
from tinylm_jax.core.model import build_model, init_params


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the fast path's split products
def test_the_products_found_carry_every_training_flop_of_the_step(precision):
    """Training a dense kernel costs 6 FLOPs per parameter per token (forward, and the two
    gradient products), and causal attention as computed 12 * L * D per token per layer (QK^T
    and AV, forward and two gradients each): the products parsed from the optimised module, with
    their contracted sizes, must add up to exactly that, so none was missed or miscounted."""
    cfg = tiny_config()
    profile = profile_step(cfg, precision, steps=1)
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
    ("jit(_train_step)/jvp(TinyTransformerLM)/layers_1/attn/layers_1/attn/mul",
     ("block/attn", "forward")),
    ("", ("(unnamed by XLA)", "unknown")),
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


# A module as XLA prints it (long lines continued with a backslash here): a fusion calling
# two products, one with its operand shapes printed, and a tuple-shaped instruction.
HLO = """\
HloModule m, entry_computation_layout={(f32[8,4]{1,0}, f32[4,2]{1,0})->(f32[8,2]{1,0}, f32[])}

%fused_pair (p0: f32[8,4], p1: f32[4,2]) -> f32[8,2] {
  %p0 = f32[8,4]{1,0} parameter(0)
  %p1 = f32[4,2]{1,0} parameter(1)
  %dot.1 = f32[8,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %dot.2 = f32[8,2]{1,0} dot(f32[8,4]{1,0} %p0, f32[4,2]{1,0} %p1), \
lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[8,4], b: f32[4,2]) -> (f32[8,2], f32[]) {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,2]{1,0} parameter(1)
  %ynn_fusion = f32[8,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_pair, \
metadata={op_name="jit(_train_step)/jvp(TinyTransformerLM)/head/dot_general"}
  %t = (f32[8,2]{1,0}, f32[]) tuple(%ynn_fusion, %c)
}
"""


def test_a_fusion_carries_every_product_it_calls_and_printed_operand_shapes_are_read():
    instructions = parse_module(HLO)
    fused = instructions["ynn_fusion"]
    assert (fused.part, fused.phase, fused.product.flops) == ("head", "forward", 2 * 2 * 8 * 2 * 4)
    assert fused.product.lhs == "f32[8,4]{1,0}" and "+1 more" in fused.product.contracting
    assert instructions["dot.2"].product.flops == 2 * 8 * 2 * 4
    assert instructions["t"].shape == "(f32[8,2]{1,0}, f32[])"


def test_a_product_that_cannot_be_read_is_an_error_not_a_silent_gap():
    with pytest.raises(ValueError, match="cannot read the product dot.9"):
        parse_module("  %dot.9 = f32[2,2]{1,0} dot(%nowhere, %nothing), "
                     "lhs_contracting_dims={1}, rhs_contracting_dims={0}")
