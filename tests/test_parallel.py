"""Data parallelism on CPU: 8 forced host devices, and two processes joined by jax.distributed."""

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, tiny_toml_file

from tinylm_jax.analysis.attention_stats import STAT_NAMES
from tinylm_jax.cli.run_experiment import main

EIGHT_DEVICES = textwrap.dedent("""
    import dataclasses, json, sys
    import jax, numpy as np
    from tinylm_jax.core.config import UserError, config_from_dict
    from tinylm_jax.core.data import build_dataset
    from tinylm_jax.core.parallel import check_batch_fits, data_mesh, replicate
    from tinylm_jax.core.train import create_train_state
    from tinylm_jax.core.protocol import Clock
    from tinylm_jax.run.loop import EpochProgress, Loop, evaluate, train_epoch

    assert len(jax.devices()) == 8
    cfg = config_from_dict(json.loads(sys.argv[2]))  # conftest's tiny_cfg
    data = build_dataset(open(sys.argv[1], encoding="utf-8").read(), cfg)
    results = {}
    for devices in (1, 8):
        mesh = data_mesh(devices)
        state = replicate(create_train_state(cfg, "fp32"), mesh)
        placed = dataclasses.replace(data, tokens=replicate(data.tokens, mesh))
        # 18 steps and 27 validation batches in chunks of 9: one compile of each per mesh
        run = Loop(cfg=cfg, data=placed, mesh=mesh, clock=Clock.of(cfg, data.splits, 18),
                   steps_per_chunk=9, show_progress=False)
        progress = EpochProgress(1, 18)
        state = train_epoch(run, state, progress)
        params = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        assert jax.tree.leaves(state.params)[0].sharding.mesh.devices.size == devices
        results[devices] = (progress.train_loss, evaluate(run, state), params)
    (loss1, val1, params1), (loss8, val8, params8) = results[1], results[8]
    np.testing.assert_allclose([loss8, val8], [loss1, val1], rtol=1e-6)
    for a, b in zip(params1, params8, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    try:
        check_batch_fits(cfg.batch_size, data_mesh(3))
        raise AssertionError("batch 32 over 3 devices was accepted")
    except UserError as err:
        assert "does not split evenly over 3 devices" in str(err)
    print("ok", loss1, loss8)
""")


def test_eight_devices_train_like_one(tiny_corpus, tiny_cfg):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(tiny_corpus),
                             json.dumps(tiny_cfg.to_dict())], env=env,
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(run_dir):
    with (run_dir / "history.csv").open() as f:
        return [(float(row["train_loss"]), float(row["val_loss"])) for row in csv.DictReader(f)]


def _attention_stats(run_dir):
    """attention_by_epoch.csv as (epoch, layer, head) and the statistics' values."""
    with (run_dir / "attention_by_epoch.csv").open() as f:
        return [((row["epoch"], row["layer"], row["head"]),
                 [float(row[name]) for name in STAT_NAMES]) for row in csv.DictReader(f)]


def test_two_processes_train_like_one(tmp_path, tiny_corpus, monkeypatch):
    """Two epochs of 20 steps (two compiled chunks each) under the step-based protocol (strided
    windows, evaluations on a fixed sample), in one process and in two, which both fill the
    same empty token cache. In fp32: in bf16 the all-reduce's other order (float32 rounding)
    can flip a weight's rounding to bf16 (a step of 2**-8), and the two runs' losses drifted
    0.25% apart in 20 steps."""
    toml = tiny_toml_file(tmp_path / "tiny.toml", max_steps=40, eval_every=20, train_stride=2,
                          eval_windows=60)
    flags = [str(toml), "--data", str(tiny_corpus), "--no-progress", "--steps-per-chunk", "10",
             "--precision", "fp32"]
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path / "cache-single"))
    single = tmp_path / "single"
    assert main([*flags, "--out", str(single)]) == 0
    shared = tmp_path / "shared"
    common = [sys.executable, "scripts/run_experiment.py", *flags, "--out", str(shared),
              "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
              "--process-id"]
    env = {**os.environ, "XLA_FLAGS": "",  # one CPU device per process
           "TINYLM_CACHE": str(tmp_path / "cache-shared")}
    workers = [subprocess.Popen(common + [str(rank)], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for rank in (0, 1)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-2000:]
    assert (shared / "checkpoints" / "2").is_dir() and (shared / "summary.json").is_file()
    assert list((tmp_path / "cache-shared" / "tokens").glob("*.npy"))
    for one, two in zip(_losses(single), _losses(shared), strict=True):
        assert two == pytest.approx(one, rel=1e-4)  # an all-reduce sums in another order
    attention = _attention_stats(single)
    assert {key[0] for key, _ in attention} == {"0", "1", "2"}
    for (key_one, one), (key_two, two) in zip(attention, _attention_stats(shared), strict=True):
        assert key_one == key_two and two == pytest.approx(one, rel=1e-3)  # from those params


@pytest.mark.parametrize("flags, message", [
    (["--devices", "2"], "--devices must lie in [1, 1], got 2"),
    (["--num-processes", "2"], "--num-processes and --process-id need --coordinator"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id must lie in [0, 1], got 2"),
])
def test_device_and_process_flags_are_checked(tmp_path, tiny_toml, tiny_corpus, capsys, flags,
                                              message):
    argv = [str(tiny_toml), "--data", str(tiny_corpus), "--out", str(tmp_path / "x"), *flags]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "x").exists()
