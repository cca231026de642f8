"""Steps and seconds until validation reaches a perplexity, per set of seeds:
`python scripts/time_to_quality.py results/spread/baseline results/spread/wider --out OUT`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.time_to_quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
