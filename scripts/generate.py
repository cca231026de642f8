"""Sample text from a finished run: `python scripts/generate.py runs/wider --prompt 'ROMEO:'`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.analyze import generate_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(generate_main())
