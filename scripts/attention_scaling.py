"""Cost against context length, no training: `python scripts/attention_scaling.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.bench import scaling_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
