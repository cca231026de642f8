"""tinylm_jax: the reference report's tiny Transformer language model in JAX/Flax."""
