"""export_torch.py: a run's weights into the reference's PyTorch model, and its refusals."""

import json
import runpy
import shutil

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from conftest import REPO, refused, snapshot

from tinylm_jax.cli.analyze import analyze_main, export_torch_main
from tinylm_jax.run.checkpoint import load_run


def _reference_model(path):
    """The README's recipe: the reference's model built from the file's config, loaded strictly."""
    torch = pytest.importorskip("torch")
    import safetensors.torch

    from tinylm_jax.reference.torch_reference import TinyTransformerLM

    with safetensors.safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    model = TinyTransformerLM(cfg["vocab_size"], cfg["d_model"], cfg["n_heads"], cfg["d_ff"],
                              cfg["seq_len"], cfg["n_layers"])
    model.load_state_dict(safetensors.torch.load_file(path))  # strict: every key, no other
    return torch, model.eval()


def test_the_exported_weights_give_the_jax_logits_in_the_reference_model(tiny_run, tmp_path,
                                                                         capsys):
    run_dir, _ = tiny_run
    path = tmp_path / "new" / "tiny.safetensors"  # the missing folder is made
    assert export_torch_main([str(run_dir), "--out", str(path)]) == 0
    assert capsys.readouterr().out == f"wrote {path}\n"
    torch, model = _reference_model(path)
    run = load_run(run_dir)
    ids = np.random.default_rng(0).integers(0, run.config.vocab_size, (4, run.config.seq_len))
    with torch.no_grad():
        want = model(torch.as_tensor(ids)).numpy()
    got = run.model.apply({"params": run.params}, ids)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_the_latest_checkpoint_is_exported_on_request(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    path = tmp_path / "latest.safetensors"
    assert export_torch_main([str(run_dir), "--out", str(path), "--which", "latest"]) == 0
    with safetensors.safe_open(path, "np") as f:
        metadata = f.metadata()
    assert metadata["checkpoint"] == "latest" and metadata["position"] == "epoch 2"
    latest, best = load_run(run_dir, "latest"), load_run(run_dir)  # tiny is best at epoch 1
    head = safetensors.numpy.load_file(path)["head.weight"]
    np.testing.assert_array_equal(head, np.asarray(latest.params["head"]["kernel"]).T)
    assert not np.array_equal(head, np.asarray(best.params["head"]["kernel"]).T)


def test_the_command_and_its_script_have_help(monkeypatch, capsys):
    with pytest.raises(SystemExit) as done:
        export_torch_main(["--help"])
    assert done.value.code == 0 and "--which {best,latest}" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["export_torch.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "scripts" / "export_torch.py"), run_name="__main__")
    assert done.value.code == 0 and "usage: export_torch.py" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["{run}", "--out", "{tmp}/w.pt"], "--out must be a .safetensors file"),
    (["{tmp}/none", "--out", "{tmp}/w.safetensors"], "not a run folder"),
    (["{run}", "--out", "{tmp}/folder.safetensors"], "folder.safetensors: is a folder"),
    (["{run}", "--out", "{corpus}/w.safetensors"], "exists and is not a folder"),
    (["{run}"], "the following arguments are required: --out"),
    (["{run}", "--out", "{tmp}/w.safetensors", "--which", "first"], "invalid choice: 'first'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_run, tmp_path, capsys, argv, message):
    run, corpus = tiny_run
    (tmp_path / "folder.safetensors").mkdir()
    before = snapshot(run.parent), snapshot(tmp_path), sorted(tmp_path.rglob("*"))
    values = {"run": run, "corpus": corpus, "tmp": tmp_path}
    assert message in refused(export_torch_main, [arg.format(**values) for arg in argv], capsys)
    assert (snapshot(run.parent), snapshot(tmp_path), sorted(tmp_path.rglob("*"))) == before


def test_a_run_without_positions_is_refused_before_any_folder_is_made(tiny_run, tmp_path, capsys):
    run = shutil.copytree(tiny_run[0], tmp_path / "run")  # the shared run stays as it is
    config = json.loads((run / "config.json").read_text())
    config["experiment"]["positions"] = "none"  # same params: load_run takes it
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "new" / "w.safetensors"
    message = refused(export_torch_main, [str(run), "--out", str(out)], capsys)
    assert "cannot represent positions = 'none'" in message
    assert not out.parent.exists()


def test_the_fp16_probe_finds_the_scale_at_which_the_reference_scaler_would_skip(tiny_run, capsys):
    """At 2^0 the reference's fp16 backward stays finite; at 2^100 the scaled logits' gradient no
    longer fits in float16, so GradScaler would skip the step. Reads the run, writes nothing."""
    pytest.importorskip("torch")
    run, corpus = tiny_run
    before = snapshot(run)
    assert analyze_main(["fp16-overflow", str(run), "--data", str(corpus), "--scales", "0,100",
                         "--batches", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 2 * 2  # the header, then two batches at two scales
    assert [row.split(" | ")[3] for row in rows[1:]] == ["no", "yes: step skipped"] * 2
    assert snapshot(run) == before


def test_the_fp16_probe_refuses_bad_scales_in_one_line(tiny_run, capsys):
    run, corpus = tiny_run
    for scales, message in (("16,x", "comma-separated integers"), ("200", "[0, 120]")):
        err = refused(analyze_main, ["fp16-overflow", str(run), "--data", str(corpus),
                                     "--scales", scales], capsys)
        assert message in err and err.count("\n") == 1
