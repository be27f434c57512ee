"""Drivers: run an implementation under test through a problem of the battery.

A driver is any object with a ``name`` and a method
``trajectory(problem) -> [step][layer] -> tuple of floats`` that builds the
implementation with the problem's hyperparameters, feeds it
``problem.gradients(t, params)`` at its own current weights for every step,
and returns the weights after each step, flattened.

For ``kind="clars"`` every step also receives the exact per-sample statistics
``problem.norm_statistics(t, params)`` (a :class:`lwrs.NormStatistics`,
``S1 = sum_i |g_ik|``, ``S2 = sum_i |g_ik|^2``, ``count = N``, in the
implementation's array namespace), as a keyword ``norm_stats=``: a functional
``step(params, grads, state, norm_stats=stats)``, a torch drop-in
``opt.step(norm_stats=stats)``, an optax ``tx.update(grads, state, params,
norm_stats=stats)`` (as :func:`lwrs.backends.jax.clars` takes it). The core ships the driver
for a functional ``init/step`` pair (:class:`FunctionalDriver`, any array-API
library); the framework drivers live in the backends:
:mod:`lwrs.backends.torch.conformance` (``torch.optim.Optimizer`` classes) and
:mod:`lwrs.backends.jax.conformance` (optax ``GradientTransformation`` factories).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..table import spec
from .battery import Problem
from .conventions import LAMB_BETA2, TVLARS_HYPERPARAMETERS, _check_kind
from .report import to_floats

__all__ = ["Driver", "FunctionalDriver", "ALIASES", "hyperparameter_kwargs"]

_PEER_NAMES: dict[str, tuple[str, ...]] = {
    "learning_rate": ("lr",),
    "beta": ("momentum",),
    "eta": ("trust_coefficient", "trust_coeff"),  # optax and pytorch_optimizer; timm
    "weight_decay": ("wd",),
    "beta1": ("b1",),  # optax; torch classes take betas=(beta1, beta2)
    "beta2": ("b2",),
    "decay_coefficient": (),
    "delay_steps": (),
    "alpha": (),
    "gamma_min": (),
}


_TVLARS_ONLY = ("decay_coefficient", "delay_steps", "alpha", "gamma_min")


def _aliases() -> dict[str, tuple[str, ...]]:
    """The core's name, then the torch classes' name from :mod:`lwrs.table`, then the peers' names."""
    out = {}
    for core_name, peer_names in _PEER_NAMES.items():
        owner = "lamb" if core_name in ("beta1", "beta2") else "tvlars" if core_name in _TVLARS_ONLY else "lars"
        torch_name = spec(owner).hyperparameter(core_name).torch_name
        names = [core_name] + ([torch_name] if torch_name and "[" not in torch_name else []) + list(peer_names)
        out[core_name] = tuple(dict.fromkeys(names))
    return out


ALIASES: dict[str, tuple[str, ...]] = _aliases()
"""Keyword names under which implementations take each hyperparameter: the core's name, the torch
classes' name (both from :mod:`lwrs.table`), then the names peers use (``trust_coeff``, ...)."""

_NEEDED = {"lars": ("learning_rate", "beta", "eta", "weight_decay"), "mnag": ("learning_rate", "beta", "weight_decay"),
           "lamb": ("learning_rate", "beta1", "beta2", "weight_decay"),
           "clars": ("learning_rate", "beta", "eta", "weight_decay"),
           "tvlars": ("learning_rate", "beta", "eta", "weight_decay", "decay_coefficient", "delay_steps", "alpha",
                      "gamma_min")}
_OPTIONAL = ("delay_steps", "alpha", "gamma_min")  # an implementation that hard-codes them (the official TVLARS code)


class Driver(Protocol):
    """What :func:`lwrs.testing.check` needs from an implementation under test."""

    name: str

    def trajectory(self, problem: Problem) -> list[list[tuple[float, ...]]]: ...


def hyperparameter_kwargs(factory: Callable[..., Any], kind: str, problem: Problem, learning_rate: Any,
                          names: Mapping[str, str] | None = None, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments that build ``factory`` with the problem's hyperparameters.

    Each hyperparameter goes under ``names[core_name]`` if given, else under the
    first of its :data:`ALIASES` that the factory's signature has. A factory
    that takes none of them raises ``TypeError`` naming the hyperparameter,
    except TVLARS's ``delay_steps``, ``alpha`` and ``gamma_min``, which are left
    out (an implementation may hard-code them, as the official code does).
    TVLARS's values are :data:`lwrs.testing.conventions.TVLARS_HYPERPARAMETERS`.

    Examples
    --------
    >>> from lwrs.testing.battery import battery
    >>> def make(lr, momentum, trust_coeff, weight_decay): ...
    >>> sorted(hyperparameter_kwargs(make, "lars", battery()[0], 0.5))
    ['lr', 'momentum', 'trust_coeff', 'weight_decay']
    """
    names = dict(names or {})
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: trust the core's names
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    values = {"learning_rate": learning_rate, "beta": problem.beta, "eta": problem.eta,
              "weight_decay": problem.weight_decay, "beta1": problem.beta, "beta2": LAMB_BETA2,
              **TVLARS_HYPERPARAMETERS}
    out = {}
    for core_name in _NEEDED[kind]:
        if core_name in skip:
            continue
        if core_name in ("beta1", "beta2") and "betas" in params and not names.get(core_name):
            out["betas"] = (problem.beta, LAMB_BETA2)  # torch's Adam-style pair
            continue
        key = names.get(core_name)
        if key is None:
            key = next((a for a in ALIASES[core_name] if a in params), None)
        if key is None and (accepts_any or not params):
            key = core_name
        if key is None and core_name in _OPTIONAL:
            continue  # not taken: the implementation fixes it itself
        if key is None:
            raise TypeError(f"{getattr(factory, '__name__', factory)!r} takes none of {ALIASES[core_name]} for "
                            f"{core_name}; pass names={{'{core_name}': 'its keyword'}}")
        out[key] = values[core_name]
    return out


class FunctionalDriver:
    """Drive a functional optimizer: ``make(**hyperparameters)`` returns an object with ``init`` and ``step``.

    ``step(params, grads, state)`` must return ``(params, state, ...)`` (a
    tuple whose first two items are the new parameters and state), like the
    core's :class:`lwrs.Optimizer`. ``make`` receives the learning rate as a
    float, or as a schedule ``step -> float`` on problems whose rate varies.
    Arrays are made in namespace ``xp`` (float64); ``fixed`` keyword arguments
    are passed to ``make`` unchanged.

    Examples
    --------
    >>> import numpy as np, lwrs
    >>> from lwrs.testing.battery import battery
    >>> driver = FunctionalDriver(lwrs.lars, xp=np, nesterov=False)
    >>> trajectory = driver.trajectory(battery()[0])
    >>> len(trajectory), len(trajectory[0])     # 20 steps, 4 layers
    (20, 4)
    """

    def __init__(self, make: Callable[..., Any], *, xp: Any, kind: str = "lars", name: str | None = None,
                 names: Mapping[str, str] | None = None, **fixed: Any):
        _check_kind(kind)
        self.make, self.xp, self.kind, self.names, self.fixed = make, xp, kind, dict(names or {}), fixed
        self.name = name or f"{getattr(make, '__module__', '')}.{getattr(make, '__qualname__', repr(make))}"

    def trajectory(self, problem: Problem) -> list[list[tuple[float, ...]]]:
        lr = problem.learning_rates[0] if problem.constant_rate else problem.learning_rate
        opt = self.make(**hyperparameter_kwargs(self.make, self.kind, problem, lr, self.names), **self.fixed)
        init, step = (opt.init, opt.step) if hasattr(opt, "init") else opt
        params = problem.initial_params(self.xp)
        state = init(params)
        out = []
        try:
            for t in range(problem.steps):
                extra = {"norm_stats": problem.norm_statistics(t, params)} if self.kind == "clars" else {}
                result = step(params, problem.gradients(t, params), state, **extra)
                params, state = list(result[0]), result[1]
                out.append([to_floats(w) for w in params])
        except Exception as exc:  # keep the steps that ran, for the report
            exc.partial_trajectory = out
            raise
        return out
