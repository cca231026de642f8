"""A run's validation PPL, nats per token and per character: `python scripts/evaluate.py RUN`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.analyze import evaluate_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
