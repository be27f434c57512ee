"""Jitted optimizer step with JAX: lwrs.backends.jax against optax's own LARS, in the same run.

Every method is one ``jax.jit``-compiled function ``(params, state, grads) -> (params, state)``
(``update`` then ``optax.apply_updates``, params and state donated) on its own copy of the same
float32 parameters and gradients. The methods are timed round-robin (interleaved), each sample
waits for the result (``block_until_ready``), and each method reports its median. Parameter sets:
an MLP (784-1024-1024-10) and ResNet-50's 161 parameter shapes.

Run ``python benchmarks/jax_step.py`` (``--quick`` for a smoke run); it writes
``benchmarks/results/jax_step.json``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lwrs
from _harness import interleaved_medians, resnet50_shapes, write_record
from lwrs.backends import jax as lj

HERE = pathlib.Path(__file__).resolve().parent
PEER = "optax.lars"
MAPPED = "lwrs lars, optax's conventions"


def mlp_shapes() -> list[tuple[int, ...]]:
    return [(784, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,)]


PARAMETER_SETS = {"mlp": mlp_shapes, "resnet50": resnet50_shapes}
SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, eta=1e-3)


def methods() -> dict[str, Callable[[], optax.GradientTransformation]]:
    s = SETTINGS
    return {
        PEER: lambda: optax.lars(s["lr"], weight_decay=s["weight_decay"], trust_coefficient=s["eta"],
                                 momentum=s["momentum"], nesterov=True),
        MAPPED: lambda: lj.lars(s["lr"], beta=s["momentum"], eta=s["eta"], weight_decay=s["weight_decay"],
                                weight_decay_form="norm_of_sum", adapt_mask=lambda w: True),
        "lwrs lars, defaults (raise on non-finite)": lambda: lj.lars(s["lr"], beta=s["momentum"], eta=s["eta"],
                                                                     weight_decay=s["weight_decay"]),
        "lwrs lars, on_nonfinite='skip'": lambda: lj.lars(s["lr"], beta=s["momentum"], eta=s["eta"],
                                                          weight_decay=s["weight_decay"], on_nonfinite="skip"),
        "optax.sgd nesterov (no norms)": lambda: optax.sgd(s["lr"], momentum=s["momentum"], nesterov=True),
    }


def bench(shapes, repeats: int, per_sample: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    base = {f"p{k:03d}": rng.normal(size=s).astype(np.float32) for k, s in enumerate(shapes)}
    grads = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32) * 1e-2) for k, v in base.items()}
    steps = {}
    for name, make in methods().items():
        opt = make()

        def step_fn(params, state, grads, opt=opt):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(step_fn, donate_argnums=(0, 1))
        params = {k: jnp.asarray(v) for k, v in base.items()}
        box = [params, opt.init(params)]

        def step(jitted=jitted, box=box):
            box[0], box[1] = jitted(box[0], box[1], grads)
            jax.block_until_ready(box[0])

        for _ in range(3):  # compile and warm up
            step()
        steps[name] = step
    return interleaved_medians(steps, repeats, per_sample=per_sample)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "jax_step.json")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 30
    results = {}
    for set_name, make in PARAMETER_SETS.items():
        shapes = make()[:12] if args.quick else make()
        numel = int(sum(np.prod(s) for s in shapes))
        medians = bench(shapes, repeats, 1 if args.quick else 5)
        peer = medians[PEER]
        results[set_name] = {"tensors": len(shapes), "parameters": numel, "median_ms": medians,
                             "ratio_to_optax_lars": {k: v / peer for k, v in medians.items()}}
        print(f"\n{set_name}: {len(shapes)} tensors, {numel:,} parameters")
        for name, ms in sorted(medians.items(), key=lambda kv: kv[1]):
            print(f"  {name:<44} {ms:8.3f} ms   {ms / peer:5.2f} x {PEER}")
    write_record(args.out, "python benchmarks/jax_step.py" + (" --quick" if args.quick else ""),
                 ("jax", "jaxlib", "optax"),
                 settings=("float32, jax.jit on CPU, params and state donated; lr 0.1, momentum 0.9, Nesterov, "
                           "weight decay 5e-4, trust coefficient 1e-3"),
                 jax_backend=jax.default_backend(), xla_flags=os.environ.get("XLA_FLAGS", ""),
                 lwrs_version=lwrs.__version__, repeats=repeats, results=results)
    print(f"\nwrote {args.out.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
