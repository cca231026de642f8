"""Heatmaps from an attention export: `python scripts/plot_attention.py FILE.npz`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.analyze import plot_attention_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(plot_attention_main())
