"""The package's Python API (`tinylm_jax.train`, `load_run`, ...): see `runs`."""
