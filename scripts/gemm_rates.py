"""Dense products' GFLOP/s, XLA against the vendor GEMM: `python scripts/gemm_rates.py wider`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.bench import gemm_rates_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
