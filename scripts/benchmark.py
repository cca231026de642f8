"""Training speed against the reference's PyTorch loop: `python scripts/benchmark.py baseline`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.bench import benchmark_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
