"""Shared fixtures: the real corpus (found as the package finds it: `find_corpus`), the tiny
experiment on a slice of it, and a finished run of that experiment.

The tiny experiment is defined once, here (`TINY`). A test that needs a variant asks for it by
field: `tiny_toml_text(num_epochs=2)`, `tiny_toml_file(path, lr=1e30)`, `tiny_config(lr=3e-3)`.

Session- and module-scoped fixtures are shared by the tests of one pytest-xdist worker (each
worker builds its own); a test that writes into a shared folder works on a copy.
"""

import gc
import math
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import pytest
from _pytest.config import parse_warning_filter

from tinylm_jax.cli.run_experiment import main
from tinylm_jax.core.config import ExperimentConfig, UserError, config_from_dict
from tinylm_jax.core.data import Dataset, build_dataset, resolve_corpus

REPO = Path(__file__).resolve().parent.parent
SHARED_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
# Set by the first pytest process when no corpus can be had, to why; its workers inherit it.
NO_CORPUS = "TINYLM_TESTS_NO_CORPUS"


def find_corpus() -> tuple[Path | None, str]:
    """The corpus for the tests, found as the package finds it, with this workplace's shared copy
    second: $TINYLM_DATA, the shared copy beside the checkout, then the package's own cache
    (downloaded into it and checked by sha256 when empty). (path, "") or (None, why not)."""
    if os.environ.get("TINYLM_DATA"):
        path = Path(os.environ["TINYLM_DATA"])
        return (path, "") if path.is_file() else (None, f"TINYLM_DATA={path} is no file")
    if SHARED_CORPUS.is_file():
        return SHARED_CORPUS, ""
    try:
        return resolve_corpus(None), ""
    except UserError as err:
        return None, str(err)

# The tiny experiment: seconds per epoch on a CPU, a 2-block model with 32 dims on 16-token
# windows. On the first 8,000 characters of the corpus it overfits from epoch 2 on: validation is
# best at epoch 1, and with plateau_patience 0 the learning rate halves after each of epochs 2
# and 3.
TINY = {"name": "tiny", "vocab_size": 120, "seq_len": 16, "d_model": 32, "n_heads": 4,
        "d_ff": 64, "batch_size": 32, "lr": 0.03, "num_epochs": 4, "plateau_patience": 0,
        "early_stop_patience": 3}
TINY_CHARS = 8000  # the slice of the corpus the tiny experiment trains on: about 3,000 tokens


class TomlLiteral(str):
    """A value already spelled in TOML (`"64"`, `[32]`, `nan`, `1979-05-27`): written as is."""


def toml_value(value: object) -> str:
    """`value` spelled in TOML."""
    if isinstance(value, TomlLiteral):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    raise TypeError(f"no TOML spelling for {value!r}")


def tiny_toml_text(**changes: object) -> str:
    """The tiny experiment as TOML, each field of `changes` set to its value (replaced where the
    experiment sets it, appended where it does not); a value of None drops the field."""
    fields = {**TINY, **changes}
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in fields.items()
                   if value is not None)


def tiny_toml_file(path: Path, **changes: object) -> Path:
    """Write `tiny_toml_text(**changes)` to `path`; returns `path`."""
    path.write_text(tiny_toml_text(**changes), encoding="utf-8")
    return path


def tiny_config(**changes: object) -> ExperimentConfig:
    """The tiny experiment as a config, with `changes` (None drops a field to its default)."""
    fields = {**TINY, **changes}
    return config_from_dict({key: value for key, value in fields.items() if value is not None})


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` and its bytes: equal snapshots mean nothing was written."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def refused(command: Callable[[list[str]], int], argv: list[str],
            capsys: pytest.CaptureFixture, watch: Path | None = None) -> str:
    """Run a command line in-process on input it must refuse, and check the contract of bad
    input: exit code 2, one `error:` line on stderr (no traceback), nothing on stdout, and
    nothing created or changed under `watch`. Returns the error line."""
    before = snapshot(watch) if watch else None
    folders = sorted(p for p in watch.rglob("*") if p.is_dir()) if watch else None
    try:
        code = command(argv)
    except SystemExit as usage_error:  # argparse's own checks exit from inside the parser
        code = usage_error.code
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and code == 2, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert captured.out == ""
    if watch:
        assert snapshot(watch) == before
        assert sorted(p for p in watch.rglob("*") if p.is_dir()) == folders
    return err


# One persistent XLA compilation cache for the run, shared by the xdist workers and every process
# the tests start (they inherit these variables): the package compiles its training chunks anew
# for each run (a new TrainState is a new jit cache key), and on a CPU each compile of the tiny
# model takes seconds, so runs after the first of a shape read the executable from disk instead.
# The cache holds XLA's own executables for identical programs; results are bitwise the same.
# A size limit turns on jax's file locking, so that two processes never read a half-written
# entry. Set JAX_COMPILATION_CACHE_DIR yourself to use (and keep) a cache of your own.
XLA_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                 "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
                 "JAX_COMPILATION_CACHE_MAX_SIZE": str(2**34)}
_OWN_XLA_CACHE = pytest.StashKey[str]()  # the cache this process made, and removes at the end


def pytest_configure(config: pytest.Config) -> None:
    if "PYTEST_XDIST_WORKER" not in os.environ and NO_CORPUS not in os.environ:
        corpus, why = find_corpus()  # once, in the first process; the workers inherit it
        if corpus is None:
            os.environ[NO_CORPUS] = why
        else:
            os.environ["TINYLM_DATA"] = str(corpus)
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)) > 1:
        # One core per worker: PyTorch's OpenMP threads spin-wait for each other, and a thread
        # whose core the other worker holds stalls every op (a step of the reference's loop took
        # 30 times as long). Before torch is imported; the processes tests start inherit it.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # the first process of the run
        config.stash[_OWN_XLA_CACHE] = tempfile.mkdtemp(prefix="tinylm-jax-test-xla-cache-")
        os.environ.update(JAX_COMPILATION_CACHE_DIR=config.stash[_OWN_XLA_CACHE],
                          **XLA_CACHE_ENV)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1)))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                      int(os.environ.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", 0)))
    jax.config.update("jax_compilation_cache_max_size",
                      int(os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", -1)))
    _apply_warning_filters_for_the_whole_session(config)


def _apply_warning_filters_for_the_whole_session(config: pytest.Config) -> None:
    """pyproject's filterwarnings, for the whole process rather than each test's run alone: the
    orbax leftovers it names may be collected at the session's end, outside any test."""
    for entry in config.getini("filterwarnings"):
        warnings.filterwarnings(*parse_warning_filter(entry, escape=False))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Collect the garbage while the session still runs: under xdist a worker counts as done
    once this hook returns, and one still busy five seconds after that (pytest's final garbage
    collections, slow with jax's callback on each) is interrupted with a SIGINT."""
    for _ in range(3):
        gc.collect()


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_XLA_CACHE, None)
    if own:
        shutil.rmtree(own, ignore_errors=True)
        for name in ("JAX_COMPILATION_CACHE_DIR", *XLA_CACHE_ENV):
            os.environ.pop(name, None)


# The slowest files first (by their time on one worker), the rest in their usual order: xdist
# hands whole files to whichever worker is free in this order (pyproject's --dist loadfile
# --no-loadscope-reorder), so that the two workers finish at about the same time.
SLOW_FILES_FIRST = ("test_loop.py", "test_cli.py", "test_reliability.py", "test_parallel.py",
                    "test_commands.py", "test_api.py", "test_scaling.py", "test_docs.py",
                    "test_export.py", "test_package.py", "test_bf16.py", "test_train.py",
                    "test_notebook.py", "test_model.py", "test_interop.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
    if NO_CORPUS in os.environ and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        # Said once, at the start (a worker's stderr is the terminal's): never a silent skip.
        needing = sum("corpus_path" in item.fixturenames for item in items)
        sys.__stderr__.write(f"\nNO CORPUS: {needing} of {len(items)} tests need the corpus "
                             f"and will be skipped ({os.environ[NO_CORPUS]}). Fix: export "
                             "TINYLM_DATA=/path/to/tinyshakespeare/input.txt\n\n")
        sys.__stderr__.flush()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Every test module is imported by now: refuse to test a tinylm_jax from elsewhere (a
    stale editable install serves modules the working tree no longer has)."""
    strays = sorted(name for name, module in list(sys.modules.items())
                    if name.split(".")[0] == "tinylm_jax"
                    and getattr(module, "__file__", None)
                    and not Path(module.__file__).resolve().is_relative_to(REPO))
    if strays:
        raise pytest.UsageError(f"tinylm_jax modules imported from outside {REPO}: "
                                f"{', '.join(strays)}")


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    if NO_CORPUS in os.environ:
        pytest.skip(f"no corpus: {os.environ[NO_CORPUS]}")
    return Path(os.environ["TINYLM_DATA"])


@pytest.fixture(scope="session")
def corpus_text(corpus_path: Path) -> str:
    return corpus_path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_cfg() -> ExperimentConfig:
    """The tiny model with a gentler rate and the default plateau and early stop (the golden
    train-step values and the hand-worked plateau sequence are for this config)."""
    return tiny_config(lr=3e-3, num_epochs=2, plateau_patience=None, early_stop_patience=None)


@pytest.fixture
def tiny_corpus(tmp_path: Path, corpus_text: str) -> Path:
    """The first 8,000 characters of the corpus, in a file of the test's own."""
    path = tmp_path / "tiny.txt"
    path.write_text(corpus_text[:TINY_CHARS], encoding="utf-8")
    return path


@pytest.fixture
def tiny_toml(tmp_path: Path) -> Path:
    """The tiny experiment's TOML, in a file of the test's own."""
    return tiny_toml_file(tmp_path / "tiny.toml")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> tuple[Path, Path]:
    """(run folder, corpus) of the tiny experiment after two epochs (best at epoch 1). Tests
    that write into the run folder or the corpus work on a copy."""
    root = tmp_path_factory.mktemp("tiny_run")
    corpus = root / "tiny.txt"
    corpus.write_text(corpus_text[:TINY_CHARS], encoding="utf-8")
    toml = tiny_toml_file(root / "tiny.toml", num_epochs=2)
    run = root / "run"
    assert main([str(toml), "--data", str(corpus), "--out", str(run), "--no-progress"]) == 0
    return run, corpus


@pytest.fixture(scope="session")
def tiny_data(corpus_text: str, tiny_cfg: ExperimentConfig) -> Dataset:
    """`tiny_cfg`'s dataset of the first 8,000 characters (its own BPE): read it, never change
    it."""
    return build_dataset(corpus_text[:TINY_CHARS], tiny_cfg)
