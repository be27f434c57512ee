"""Data-parallel CLARS and LARS with lwrs.backends.jax over 2 host CPU devices, equal to one device.

XLA fixes the number of host devices when JAX starts, so the check runs in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (and
float64), leaving this process's JAX untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lwrs.backends import jax as lj

    assert len(jax.devices()) == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("data",))
    rng = np.random.default_rng(0)
    params = {"hidden": {"kernel": jnp.asarray(rng.normal(size=(6, 16)) / 2), "bias": jnp.zeros(16)},
              "out": {"kernel": jnp.asarray(rng.normal(size=(16, 2)) / 4), "bias": jnp.zeros(2)}}
    batch = (jnp.asarray(rng.normal(size=(32, 6))), jnp.asarray(rng.normal(size=(32, 2))))

    def loss(p, example):
        x, y = example
        h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return jnp.sum((h @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)

    def make(kind):
        if kind == "clars":
            return lj.clars(0.2, eta=0.5, weight_decay=1e-3)
        return optax.chain(optax.clip_by_global_norm(1.0), lj.lars(0.2, eta=0.2, weight_decay=1e-3))

    def run(kind, step_fn, b, steps=5):
        opt = make(kind)
        p, s = params, opt.init(params)
        for _ in range(steps):
            p, s = step_fn(opt, p, s, b)
        return p

    def single(opt, p, s, batch):
        _, g, stats = lj.grad_and_norm_statistics(loss, p, batch)
        u, s = opt.update(g, s, p, norm_stats=stats)
        return optax.apply_updates(p, u), s

    def parallel(opt, p, s, batch, reduce=True):
        def local(p, s, b):
            _, g, stats = lj.grad_and_norm_statistics(loss, p, b)
            if reduce:
                g, stats = jax.lax.pmean(g, "data"), lj.psum_statistics(stats, "data")
            u, s = opt.update(g, s, p, norm_stats=stats)
            return optax.apply_updates(p, u), s
        f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P(), P()), check_vma=False)
        return f(p, s, batch)

    split = jax.device_put(batch, NamedSharding(mesh, P("data")))

    def gap(a, b):
        return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    for kind in ("clars", "lars"):
        want = run(kind, jax.jit(single, static_argnums=0), batch)
        moved = gap(want, params)
        got = run(kind, jax.jit(parallel, static_argnums=0), split)
        # the plain jitted step on the sharded batch: XLA inserts the reductions itself
        got_sharded = run(kind, jax.jit(single, static_argnums=0), split)
        local_only = run(kind, jax.jit(lambda o, p, s, b: parallel(o, p, s, b, reduce=False), static_argnums=0), split)
        print(kind, moved, gap(got, want), gap(got_sharded, want), gap(local_only, want))
        assert moved > 1e-2
        assert gap(got, want) < 1e-12 and gap(got_sharded, want) < 1e-12
        assert gap(local_only, want) > 1e-6     # without the reductions the replicas' steps differ
    print("ok")
    """
)


def test_data_parallel_over_two_host_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


DOCS_SCRIPT = textwrap.dedent(
    """
    import pathlib, re, sys, textwrap
    import jax
    assert jax.device_count() == 2, jax.devices()
    text = pathlib.Path(sys.argv[1]).read_text()
    section = text[text.index("Data parallelism\\n-----"):]
    blocks = re.findall(r"\\.\\. code-block:: python\\n\\n((?:   .*\\n|\\n)+)", section)
    assert len(blocks) == 2, len(blocks)
    namespace = {}
    for block in blocks:
        exec(textwrap.dedent(block), namespace)   # the second block asserts: equal to one device
    print(namespace["gap"], namespace["moved"])
    print("ok")
    """
)


def test_the_docs_shard_map_recipe_over_two_devices_equals_one_device():
    """docs/jax.rst's shard_map recipe, as written, run over two host devices (a 2x gradient failed before)."""
    page = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "jax.rst")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", DOCS_SCRIPT, page], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
