"""The conformance kit's driver for optax ``GradientTransformation`` factories.

:class:`OptaxDriver` builds a transformation with a problem's hyperparameters
(``make(learning_rate=..., momentum=..., trust_coefficient=..., weight_decay=...)``,
e.g. :func:`optax.lars`), runs it through the battery of :mod:`lwrs.testing`
in float64 (inside ``jax.enable_x64``), with ``tx.update(grads, state, params)``
and :func:`optax.apply_updates`, and returns the trajectory. For ``kind="clars"``
``update`` also receives ``norm_stats=``, the exact :class:`lwrs.NormStatistics` of the
problem's per-sample gradients (one entry per leaf, in flattening order), as
:func:`lwrs.backends.jax.clars` takes it. A varying
learning rate is passed as a schedule of optax's step count. The core's
reference run uses NumPy float64 arrays (faster than eager JAX, same values).
:func:`check` and
:func:`assert_implements` are :func:`lwrs.testing.check` and
:func:`lwrs.testing.assert_implements` for such factories.

Examples
--------
>>> import optax
>>> from lwrs.backends.jax.conformance import check
>>> report = check(optax.lars)
>>> report.best.convention["weight_decay_form"], [r.problem for r in report.best.problems if not r.matched]
('norm_of_sum', ['zero_gradient'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwrs.testing import Problem, Report
from lwrs.testing import assert_implements as _assert_implements
from lwrs.testing import check as _check
from lwrs.testing.drivers import hyperparameter_kwargs

__all__ = ["OptaxDriver", "check", "assert_implements"]


class OptaxDriver:
    """Drive an optax ``GradientTransformation`` factory in float64.

    Hyperparameters go under ``names[core_name]`` or the first of
    :data:`lwrs.testing.drivers.ALIASES` that ``make`` takes (``learning_rate``,
    ``momentum``, ``trust_coefficient``, ``weight_decay``); ``fixed`` keyword
    arguments are passed unchanged. ``update`` runs eagerly (each problem has its own
    hyperparameters, so a compiled update would be compiled once per problem); ``jit=True``
    runs it under ``jax.jit``.
    """

    xp = jnp
    reference_xp = np

    def __init__(self, make: Callable[..., Any], *, kind: str = "lars", name: str | None = None,
                 names: Mapping[str, str] | None = None, jit: bool = False, **fixed: Any):
        self.make, self.kind, self.names, self.fixed, self.jit = make, kind, dict(names or {}), fixed, jit
        base = name or f"{getattr(make, '__module__', '')}.{getattr(make, '__qualname__', repr(make))}"
        extra = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        self.name = f"{base}({extra})" if extra else base

    def trajectory(self, problem: Problem) -> list[list[tuple[float, ...]]]:
        import optax

        with jax.enable_x64(True):
            if problem.constant_rate:
                lr: Any = problem.learning_rates[0]
            else:
                table = jnp.asarray(problem.learning_rates, dtype=jnp.float64)

                def lr(count: Any) -> Any:
                    return table[count]

            tx = self.make(**hyperparameter_kwargs(self.make, self.kind, problem, lr, self.names), **self.fixed)
            params = problem.initial_params(jnp)
            state = tx.init(params)
            update = jax.jit(tx.update) if self.jit else tx.update
            out = []
            try:
                for t in range(problem.steps):
                    extra = {"norm_stats": problem.norm_statistics(t, params)} if self.kind == "clars" else {}
                    updates, state = update(problem.gradients(t, params), state, params, **extra)
                    params = optax.apply_updates(params, updates)
                    out.append([tuple(np.asarray(w, dtype=np.float64).reshape(-1).tolist()) for w in params])
            except Exception as exc:  # keep the steps that ran, for the report
                exc.partial_trajectory = out
                raise
        return out


def _run_x64(function: Callable[..., Report], *args: Any, **kwargs: Any) -> Report:
    with jax.enable_x64(True):
        return function(*args, **kwargs)


def check(make: Callable[..., Any], kind: str = "lars", *, problems: Sequence[Problem] | None = None,
          tolerance: float = 1e-10, names: Mapping[str, str] | None = None,
          options: Mapping[str, Any] | None = None, name: str | None = None, **fixed_conventions: Any) -> Report:
    """:func:`lwrs.testing.check` for an optax ``GradientTransformation`` factory."""
    driver = OptaxDriver(make, kind=kind, names=names, name=name, **dict(options or {}))
    return _run_x64(_check, driver, kind, problems=problems, tolerance=tolerance, **fixed_conventions)


def assert_implements(kind: str, make: Callable[..., Any], *, problems: Sequence[Problem] | None = None,
                      tolerance: float = 1e-10, names: Mapping[str, str] | None = None,
                      options: Mapping[str, Any] | None = None, name: str | None = None,
                      **convention: Any) -> Report:
    """:func:`lwrs.testing.assert_implements` for an optax ``GradientTransformation`` factory."""
    driver = OptaxDriver(make, kind=kind, names=names, name=name, **dict(options or {}))
    return _run_x64(_assert_implements, kind, driver, problems=problems, tolerance=tolerance, **convention)
