"""fttw_jax: Fire Together Wire Together (FTWT) dynamic channel pruning in JAX/Flax."""

__version__ = '0.1.0'
