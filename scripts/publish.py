"""A run's weights as a published model: `python scripts/publish.py RUN --out DIR`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.analyze import publish_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
