"""The reference report's figures and tables from a run:
`python scripts/analyze.py all runs/wider`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.analyze import analyze_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(analyze_main())
