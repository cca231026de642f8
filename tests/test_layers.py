"""The package's layers, lowest first: a module imports only from its own layer or lower ones.

  core      config, data, model, training steps and loops, the protocol's rules, atomic files
  seed      the seed report's numbers, its PyTorch model, weights to and from it
  run       the run folder, checkpoints, signals, the experiment loop
  analysis  what a finished run shows: statistics, reports, plots, sampling
  bench     speed and scaling measurements
  cli       every command line (scripts/ are one-line wrappers of these)
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tinylm_jax"
LAYERS = ("core", "seed", "run", "analysis", "bench", "cli")


def imported_layers(path: Path) -> set[str]:
    """The layers a module imports from: `tinylm_jax.<layer>...` in any import statement."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "tinylm_jax":  # from tinylm_jax import <layer>
                names = [f"tinylm_jax.{alias.name}" for alias in node.names]
        found |= {name.split(".")[1] for name in names
                  if name.startswith("tinylm_jax.") and name.count(".") >= 1}
    return found


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


def test_the_import_check_sees_an_upward_import(tmp_path):
    """The rule's own check: a run module importing analysis is caught, in both spellings."""
    module = tmp_path / "m.py"
    module.write_text("from tinylm_jax.analysis import reports\nimport tinylm_jax.cli.console\n"
                      "from tinylm_jax.core.config import UserError\n")
    assert imported_layers(module) == {"analysis", "cli", "core"}
