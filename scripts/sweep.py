"""Sweep an experiment over a grid of overrides and seeds: `python scripts/sweep.py baseline
--grid lr=1e-3,3e-3 --seeds 0-2`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
