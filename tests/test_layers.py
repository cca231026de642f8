"""The package's layers, lowest first: a module imports only from its own layer or lower ones.

  core      config, data, model, training steps, the protocol's rules, atomic files: pure
            computation, with no bars, clocks or process state (no tqdm, time or sys)
  reference the reference report's numbers, its PyTorch model, weights to and from it
  run       the run folder, checkpoints, signals, the training loop, one experiment
  analysis  what a finished run shows: statistics, reports, plots, sampling
  bench     speed and scaling measurements
  api       training and reading runs from Python (`tinylm_jax.train`, `load_run`)
  cli       every command line (scripts/ are one-line wrappers of these)
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinylm_jax"
LAYERS = ("core", "reference", "run", "analysis", "bench", "api", "cli")


CORE_NEVER_IMPORTS = ("tqdm", "time", "sys")


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names (`from tinylm_jax import run` names
    tinylm_jax.run)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "tinylm_jax":  # from tinylm_jax import <layer>
                found |= {f"tinylm_jax.{alias.name}" for alias in node.names}
    return found


def imported_layers(path: Path) -> set[str]:
    """The layers a module imports from: `tinylm_jax.<layer>...` in any import statement."""
    return {name.split(".")[1] for name in imported_modules(path)
            if name.startswith("tinylm_jax.")}


def test_every_module_sits_in_a_layer():
    modules = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py")]
    strays = [str(m) for m in modules if m.parts[0] not in LAYERS and m.name != "__init__.py"]
    assert not strays
    assert {m.parts[0] for m in modules if len(m.parts) > 1} == set(LAYERS)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            continue
        rank = LAYERS.index(parts[0])
        upward += [f"{'/'.join(parts)} imports {layer}" for layer in imported_layers(path)
                   if LAYERS.index(layer) > rank]
    assert not upward


def test_core_imports_no_bars_clocks_or_process_state():
    found = [f"{path.relative_to(PACKAGE)} imports {name}"
             for path in sorted((PACKAGE / "core").rglob("*.py"))
             for name in imported_modules(path) if name.split(".")[0] in CORE_NEVER_IMPORTS]
    assert not found


def test_the_import_check_sees_an_upward_import(tmp_path):
    """The rule's own check: a run module importing analysis is caught, in both spellings."""
    module = tmp_path / "m.py"
    module.write_text("from tinylm_jax.analysis import reports\nimport tinylm_jax.cli.console\n"
                      "from tinylm_jax.core.config import UserError\nimport time, tqdm.auto\n")
    assert imported_layers(module) == {"analysis", "cli", "core"}
    assert {"time", "tqdm.auto"} <= imported_modules(module)
