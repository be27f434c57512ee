"""lwrs.backends.jax.grad_and_norm_statistics against the core's statistics of vmap'd per-sample gradients."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import lwrs  # noqa: E402
from lwrs.backends import jax as lj  # noqa: E402


def _loss(params, example):
    x, y = example
    return jnp.sum((jnp.tanh(x @ params["w"] + params["b"]) @ params["v"] - y) ** 2)


def _setup():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 6))), "b": jnp.asarray(rng.normal(size=6) / 5),
              "v": jnp.asarray(rng.normal(size=(6, 2)))}
    batch = (jnp.asarray(rng.normal(size=(17, 4))), jnp.asarray(rng.normal(size=(17, 2))))
    return params, batch


@pytest.mark.parametrize("chunk_size", [None, 5, 17, 64])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_statistics_and_mean_gradient_equal_the_core_on_per_sample_gradients(chunk_size, weight_decay):
    with jax.enable_x64(True):
        params, batch = _setup()
        mask = {"w": True, "b": False, "v": True}
        loss, grads, stats = jax.jit(lambda p, b: lj.grad_and_norm_statistics(
            _loss, p, b, chunk_size=chunk_size, weight_decay=weight_decay, weight_decay_mask=mask))(params, batch)
        per_sample = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(params, batch)
        leaves = [np.asarray(g) for g in jax.tree.leaves(per_sample)]           # leaf order: b, v, w
        decayed = [g + (weight_decay * np.asarray(w) if m else 0.0)
                   for g, w, m in zip(leaves, jax.tree.leaves(params), jax.tree.leaves(mask))]
        want = lwrs.per_sample_norm_statistics(decayed)
        np.testing.assert_allclose(np.asarray(stats.sum_norms), want.sum_norms, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(stats.sum_squared_norms), want.sum_squared_norms, rtol=1e-12)
        assert stats.count == want.count == 17
        for got, g in zip(jax.tree.leaves(grads), leaves):
            np.testing.assert_allclose(np.asarray(got), g.mean(axis=0), rtol=1e-12, atol=1e-15)
        full = jnp.mean(jax.vmap(_loss, in_axes=(None, 0))(params, batch))
        np.testing.assert_allclose(float(loss), float(full), rtol=1e-12)


def test_bad_batches_are_refused():
    params, batch = _setup()
    with pytest.raises(ValueError, match=r"same leading \(batch\) axis, got sizes \[3, 17\]"):
        lj.grad_and_norm_statistics(_loss, params, (batch[0], batch[1][:3]))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        lj.grad_and_norm_statistics(_loss, params, batch, chunk_size=0)
