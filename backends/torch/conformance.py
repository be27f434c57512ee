"""The conformance kit's driver for ``torch.optim`` optimizers, and loaders for peer implementations.

:class:`TorchDriver` runs any ``torch.optim.Optimizer`` class (or a factory
``make(params, **hyperparameters)``, e.g. one that wraps an optimizer in apex's
``LARC``) through the battery of :mod:`lwrs.testing` in float64: the
parameters are ``torch.nn.Parameter`` leaves, every step sets ``p.grad`` to the
problem's gradient at the current weights and the learning rate of every
group to the step's rate, then calls ``step()`` (for ``kind="clars"``:
``step(norm_stats=stats)`` with the exact :class:`lwrs.NormStatistics` of the
problem's per-sample gradients, one entry per parameter, in order). :func:`check` and
:func:`assert_implements` are :func:`lwrs.testing.check` and
:func:`lwrs.testing.assert_implements` for such classes.

:func:`load_timm_lars` loads timm's ``Lars`` from its file, without importing
the ``timm`` package (whose top-level import needs torchvision).

Examples
--------
>>> import torch
>>> from lwrs.backends.torch.conformance import check
>>> report = check(torch.optim.SGD, "mnag")
>>> report.best.convention, report.best.matched        # lr outside the buffer: the varying rate diverges
({'nesterov': False, 'decay': 'all'}, 6)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pathlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lwrs.testing import Problem, Report
from lwrs.testing import assert_implements as _assert_implements
from lwrs.testing import check as _check
from lwrs.testing.drivers import hyperparameter_kwargs

__all__ = ["TorchDriver", "check", "assert_implements", "load_timm_lars", "load_apex_larc", "peers"]


_TIMM_NAMES: dict[Any, str] = {}


def load_timm_lars() -> type[torch.optim.Optimizer] | None:
    """timm's ``Lars`` class, loaded from ``timm/optim/lars.py`` without importing timm; ``None`` if absent.

    Importing ``timm`` needs torchvision, whose current release replaces the CPU
    torch with a CUDA build; ``optim/lars.py`` and its ``_helpers.py`` need only torch.
    """
    if "_lwrs_timm_optim.lars" in sys.modules:
        return sys.modules["_lwrs_timm_optim.lars"].Lars
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = pathlib.Path(next(iter(spec.submodule_search_locations))) / "optim"
    package = importlib.util.module_from_spec(importlib.machinery.ModuleSpec("_lwrs_timm_optim", None, is_package=True))
    package.__path__ = [str(folder)]
    sys.modules["_lwrs_timm_optim"] = package
    for name in ("_helpers", "lars"):
        sub = importlib.util.spec_from_file_location(f"_lwrs_timm_optim.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(sub)
        sys.modules[sub.name] = module
        sub.loader.exec_module(module)
    lars = sys.modules["_lwrs_timm_optim.lars"].Lars
    _TIMM_NAMES[lars] = "timm.optim.Lars"
    return lars


def load_apex_larc() -> Callable[..., Any] | None:
    """A factory ``make(params, lr, momentum, weight_decay, trust_coefficient, **larc_kwargs)`` for apex's
    ``LARC`` around ``torch.optim.SGD``; ``None`` where apex is not installed."""
    if importlib.util.find_spec("apex") is None:
        return None
    from apex.parallel.LARC import LARC  # pragma: no cover - apex is not installable on the CPU CI

    def apex_larc(params, lr, momentum, weight_decay, trust_coefficient, **kwargs):  # pragma: no cover
        return LARC(torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay),
                    trust_coefficient=trust_coefficient, **kwargs)

    return apex_larc


class TorchDriver:
    """Drive a ``torch.optim.Optimizer`` class or factory ``make(params, **hyperparameters)`` in float64.

    Hyperparameters are passed under the names of :data:`lwrs.testing.drivers.ALIASES`
    that ``make``'s signature has (``lr``, ``momentum``, ``eta`` / ``trust_coeff`` /
    ``trust_coefficient``, ``weight_decay``), or under ``names[core_name]``;
    ``fixed`` keyword arguments are passed unchanged. The core's reference run
    uses torch float64 tensors too.
    """

    xp = torch
    reference_xp = torch

    def __init__(self, make: Callable[..., Any], *, kind: str = "lars", name: str | None = None,
                 names: Mapping[str, str] | None = None, **fixed: Any):
        self.make, self.kind, self.names, self.fixed = make, kind, dict(names or {}), fixed
        qualified = f"{getattr(make, '__module__', '')}.{getattr(make, '__qualname__', repr(make))}"
        base = name or _TIMM_NAMES.get(make) or qualified
        extra = ", ".join(f"{k}={v!r}" for k, v in fixed.items())
        self.name = f"{base}({extra})" if extra else base

    def trajectory(self, problem: Problem) -> list[list[tuple[float, ...]]]:
        params = [torch.nn.Parameter(w) for w in problem.initial_params(torch)]
        kwargs = hyperparameter_kwargs(self.make, self.kind, problem, problem.learning_rates[0], self.names)
        lr_key = self.names.get("learning_rate") or next(k for k in ("lr", "learning_rate") if k in kwargs)
        opt = self.make(params, **kwargs, **self.fixed)
        out = []
        try:
            for t in range(problem.steps):
                with torch.no_grad():
                    current = [p.detach() for p in params]
                    grads = problem.gradients(t, current)
                    extra = {"norm_stats": problem.norm_statistics(t, current)} if self.kind == "clars" else {}
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                for group in opt.param_groups:
                    group[lr_key] = problem.learning_rates[t]
                opt.step(**extra)
                out.append([tuple(p.detach().reshape(-1).tolist()) for p in params])
        except Exception as exc:  # keep the steps that ran, for the report
            exc.partial_trajectory = out
            raise
        return out


def check(optimizer: Callable[..., Any], kind: str = "lars", *, problems: Sequence[Problem] | None = None,
          tolerance: float = 1e-10, names: Mapping[str, str] | None = None,
          options: Mapping[str, Any] | None = None, name: str | None = None, **fixed_conventions: Any) -> Report:
    """:func:`lwrs.testing.check` for a ``torch.optim.Optimizer`` class or factory.

    ``options`` are keyword arguments for the optimizer itself (e.g.
    ``{"trust_clip": True}``); ``fixed_conventions`` are conventions not to search.
    """
    driver = TorchDriver(optimizer, kind=kind, names=names, name=name, **dict(options or {}))
    return _check(driver, kind, problems=problems, tolerance=tolerance, **fixed_conventions)


def assert_implements(kind: str, optimizer: Callable[..., Any], *, problems: Sequence[Problem] | None = None,
                      tolerance: float = 1e-10, names: Mapping[str, str] | None = None,
                      options: Mapping[str, Any] | None = None, name: str | None = None,
                      **convention: Any) -> Report:
    """:func:`lwrs.testing.assert_implements` for a ``torch.optim.Optimizer`` class or factory.

    Examples
    --------
    >>> from lwrs.backends.torch import LARS
    >>> report = assert_implements("lars", LARS, nesterov=True, adapt="ndim>1")
    """
    driver = TorchDriver(optimizer, kind=kind, names=names, name=name, **dict(options or {}))
    return _assert_implements(kind, driver, problems=problems, tolerance=tolerance, **convention)


def peers() -> dict[str, Callable[..., Any]]:
    """The LARS implementations in torch the kit knows and finds installed, by a readable name.

    lwrs's own ``LARS``, timm's ``Lars``, pytorch_optimizer's ``LARS``, and apex's
    ``LARC`` around ``torch.optim.SGD`` (only where apex is installed).
    """
    from lwrs.backends.torch import LARS

    out: dict[str, Callable[..., Any]] = {"lwrs.backends.torch.LARS": LARS}
    timm_lars = load_timm_lars()
    if timm_lars is not None:
        out["timm.optim.Lars"] = timm_lars
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        from pytorch_optimizer import LARS as PyTorchOptimizerLARS

        out["pytorch_optimizer.LARS"] = PyTorchOptimizerLARS
    apex = load_apex_larc()
    if apex is not None:  # pragma: no cover - apex is not installable on the CPU CI
        out["apex.parallel.LARC"] = apex
    return out
