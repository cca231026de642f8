"""tinylm_jax: the seed report's tiny Transformer language model in JAX/Flax."""
