"""Train one of the reference report's experiments: `python scripts/run_experiment.py wider`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.run_experiment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
