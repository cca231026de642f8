"""A run's weights for the reference's PyTorch model: `python scripts/export_torch.py runs/wider
--out wider.safetensors`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm_jax.cli.analyze import export_torch_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_torch_main())
