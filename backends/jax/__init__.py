"""JAX backend of lwrs (the optax adapter is being built); :mod:`lwrs.backends.jax.conformance` drives optax transformations through :mod:`lwrs.testing`."""
