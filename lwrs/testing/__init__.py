r"""The conformance kit: which paper equations does an optimizer implement, and under which conventions?

:func:`check` drives an implementation through a fixed battery of small,
seeded float64 problems (:func:`~lwrs.testing.battery.battery`: layers with
biases, a zero-initialised layer, a zero-gradient layer, a varying learning
rate, weight decay near its equilibrium, 1-D parameters, a learning rate above
1), runs the core (:func:`lwrs.lars`, CLARS eq. 3; :func:`lwrs.clars`, CLARS eq. 5, with exact
per-sample statistics handed to every step; :func:`lwrs.tvlars`, TVLARS Algorithm 1;
:func:`lwrs.mnag`, eq. 2/4; or :func:`lwrs.lamb`) on the same problems under every convention the core supports
(:mod:`lwrs.testing.conventions`), and reports which conventions match, to
what tolerance, and the first step and layer where the closest one diverges.
:func:`assert_implements` turns that into an assertion for a test suite.

This module is core: it imports no array library and no backend. It drives a
functional ``init/step`` pair itself (:class:`FunctionalDriver`, any
array-API library); ``torch.optim`` classes and optax transformations are
driven by :mod:`lwrs.backends.torch.conformance` and
:mod:`lwrs.backends.jax.conformance`, which offer the same ``check`` and
``assert_implements`` for them. From the shell, ``python -m lwrs.testing
timm.optim.Lars`` prints the report of any of the three.

Examples
--------
>>> import numpy as np, lwrs
>>> from lwrs.testing import FunctionalDriver, check, assert_implements
>>> report = check(FunctionalDriver(lwrs.lars, xp=np, nesterov=False, weight_decay_form="norm_of_sum"))
>>> report.conforms, report.best.convention["nesterov"], report.best.convention["weight_decay_form"]
(True, False, 'norm_of_sum')
>>> try:
...     assert_implements("lars", FunctionalDriver(lwrs.lars, xp=np, name="lwrs.lars"), nesterov=False)
... except AssertionError as error:
...     print(str(error).splitlines()[0])
lwrs.lars does not implement lars with nesterov=False: 0 of 7 problems match.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .battery import Layer, Problem, battery
from .conventions import FACTORS, KINDS, _check_kind, conventions
from .drivers import Driver, FunctionalDriver
from .report import ConventionResult, Divergence, Report, compare

__all__ = [
    "ConformanceError",
    "ConventionResult",
    "Divergence",
    "Driver",
    "FACTORS",
    "FunctionalDriver",
    "KINDS",
    "Layer",
    "Problem",
    "Report",
    "assert_implements",
    "battery",
    "check",
    "conventions",
]


class ConformanceError(AssertionError):
    """An implementation does not match the core under the conventions asked for."""


def _reference_xp(driver: Any) -> Any:
    xp = getattr(driver, "reference_xp", None) or getattr(driver, "xp", None)
    if xp is None:
        raise TypeError(f"driver {driver!r} names no array namespace for the core's run (reference_xp or xp)")
    return xp


def check(driver: Driver, kind: str = "lars", *, problems: Sequence[Problem] | None = None,
          tolerance: float = 1e-10, **fixed: Any) -> Report:
    r"""Run ``driver`` through the battery and compare it with the core under every convention.

    Parameters
    ----------
    driver : Driver
        The implementation under test (:class:`FunctionalDriver`, or a backend's driver).
    kind : {"lars", "mnag", "lamb", "clars", "tvlars"}
        The core optimizer to compare with (:func:`lwrs.lars`, :func:`lwrs.mnag`, :func:`lwrs.lamb`,
        :func:`lwrs.clars`, :func:`lwrs.tvlars`). For ``"clars"`` the driver hands every step the
        exact per-sample statistics (``norm_stats=``, see :mod:`lwrs.testing.drivers`).
    problems : sequence of Problem, optional
        Default: :func:`~lwrs.testing.battery.battery` (7 problems, 20 steps).
    tolerance : float
        Largest relative error per layer and step that still matches (float64 runs).
    **fixed
        Conventions not to search, e.g. ``weight_decay_form="norm_of_sum"``.

    Returns
    -------
    Report
        ``print(report)`` gives the text report; ``report.best``, ``report.matching``.
    """
    _check_kind(kind)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a relative tolerance in [0, 1), got {tolerance!r}")
    built_for = getattr(driver, "kind", kind)
    if built_for != kind:
        raise ValueError(f"{driver.name} was given to its driver as kind={built_for!r} but is checked as "
                         f"kind={kind!r}; build the driver with kind={kind!r}")
    problems = tuple(p.for_kind(kind) for p in (battery() if problems is None else problems))
    if not problems:
        raise ValueError("problems is empty: a check of no problem would pass any implementation")
    trajectories, failures = {}, {}
    for p in problems:
        try:
            trajectories[p.name] = driver.trajectory(p)
        except Exception as exc:  # a crash while stepping is a finding: report where, go on with the other problems
            if not hasattr(exc, "partial_trajectory"):  # not from the steps (e.g. the optimizer cannot be built)
                raise
            trajectories[p.name] = list(exc.partial_trajectory)
            failures[p.name] = f"the implementation raised {type(exc).__name__}: {exc}"
    return compare(kind, driver.name, trajectories, problems, xp=_reference_xp(driver), tolerance=tolerance,
                   fixed=fixed, failures=failures)


def assert_implements(kind: str, driver: Driver, *, problems: Sequence[Problem] | None = None,
                      tolerance: float = 1e-10, **convention: Any) -> Report:
    """Raise :class:`ConformanceError` unless ``driver`` matches the core under ``convention`` on every problem.

    Factors not named in ``convention`` may take any value the core supports.
    The message names the problem, the step and the layer where the closest
    convention with the requested values diverges, the expected and the
    obtained values, and the closest convention of the core overall.
    Returns the :class:`Report` when the implementation conforms.
    """
    conventions(kind, **convention)  # a clear error for an unknown factor or value, before any run
    report = check(driver, kind, problems=problems, tolerance=tolerance)
    wanted = [r for r in report.results if all(r.convention[k] == v for k, v in convention.items())]
    n = len(report.problems)
    if wanted[0].matched == n:
        return report
    asked = ", ".join(f"{k}={v!r}" for k, v in convention.items()) or "any convention"
    div = wanted[0].first_divergence
    lines = [f"{driver.name} does not implement {kind} with {asked}: {wanted[0].matched} of {n} problems match.",
             f"first divergence (closest such convention: {wanted[0].label()}):",
             f"  {div.describe()}",
             f"closest convention of the core overall ({report.best.matched} of {n} problems): {report.best.label()}"]
    lines += [f"  - {d}" for d in report.diagnoses]
    raise ConformanceError("\n".join(lines))
