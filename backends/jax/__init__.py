r"""The JAX backend: lwrs's optimizers as optax gradient transformations.

:func:`mnag`, :func:`lars`, :func:`clars`, :func:`tvlars` and :func:`lamb`
take the options of the core factories of the same names and return an
:class:`optax.GradientTransformationExtraArgs` that works on any pytree of
parameters, under ``jax.jit``, and in ``optax.chain``. The per-layer
diagnostics of the last update are arrays in the state
(``state.diagnostics``). :func:`grad_and_norm_statistics` gives CLARS its exact
per-sample statistics; :func:`psum_statistics` sums them over devices.
:mod:`lwrs.backends.jax.conformance` drives optax transformations through
:mod:`lwrs.testing`.

Examples
--------
>>> import jax, jax.numpy as jnp, optax
>>> from lwrs.backends import jax as lj
>>> params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
>>> opt = optax.chain(optax.clip_by_global_norm(1.0), lj.lars(0.1, weight_decay=1e-4))
>>> state = opt.init(params)
>>> grads = jax.tree.map(jnp.ones_like, params)
>>> updates, state = jax.jit(opt.update)(grads, state, params)
>>> params = optax.apply_updates(params, updates)
>>> state[1].diagnostics.trust_ratios.shape          # one entry per leaf: b, w
(2,)
"""

from .per_sample import grad_and_norm_statistics, psum_statistics
from .transforms import LambState, MomentumState, clars, lamb, lars, mnag, tvlars

__all__ = [
    "LambState",
    "MomentumState",
    "clars",
    "grad_and_norm_statistics",
    "lamb",
    "lars",
    "mnag",
    "psum_statistics",
    "tvlars",
]
