"""Where a training step's time goes: `python scripts/profile_step.py wider --precision bf16`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.bench import profile_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
