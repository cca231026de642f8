"""The package as a user gets it: installed outside the checkout, its one command, its API at the
top, and how quickly `import tinylm_jax` returns."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from tinylm_jax.cli import tinylm


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(site folder, a folder outside the checkout): the package installed from a wheel of the
    checkout into a folder of its own (its dependencies are this environment's)."""
    root = tmp_path_factory.mktemp("installed")
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(REPO)], check=True,
                   capture_output=True, timeout=600)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return site, elsewhere


def _run(installed, *command):
    site, elsewhere = installed
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy, never the checkout
    return subprocess.run(list(map(str, command)), cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_installed_package_finds_its_experiments_from_another_folder(installed):
    site, _ = installed
    done = _run(installed, sys.executable, "-c", "import tinylm_jax as t; print(t.__file__); "
                "print(t.load_config('wider').d_model)")
    assert done.returncode == 0, done.stderr
    where, d_model = done.stdout.split()
    assert where.startswith(str(site)) and d_model == "256"


def test_the_installed_command_trains_from_another_folder(installed, corpus_path):
    site, elsewhere = installed
    done = _run(installed, site / "bin" / "tinylm", "train", "baseline", "--dry-run", "--data",
                corpus_path, "--out", "X")
    assert done.returncode == 0, done.stderr
    assert "parameters: 391,552" in done.stdout and "run folder: X" in done.stdout


def test_tinylm_lists_every_command_and_hands_each_its_own_parser(capsys):
    assert tinylm.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in tinylm.COMMANDS)
    for name in tinylm.COMMANDS:
        with pytest.raises(SystemExit) as done:
            tinylm.main([name, "--help"])
        assert done.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: tinylm {name} ")


@pytest.mark.parametrize("argv, message", [([], "no command given"),
                                           (["trian"], "unknown command 'trian'")])
def test_tinylm_without_a_known_command_is_one_line(argv, message, capsys):
    assert tinylm.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}; choose one of train, sweep, analyze") and \
        err.count("\n") == 1


def test_importing_the_package_loads_no_jax():
    done = subprocess.run([sys.executable, "-c", "import sys, tinylm_jax; "
                           "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                           "('jax', 'flax', 'numpy', 'tinylm_jax')))"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.stdout.strip() == "['tinylm_jax']"
