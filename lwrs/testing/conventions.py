r"""The conventions the core can express, and the core's trajectory under each of them.

Implementations of one paper formula disagree on details the papers leave open.
For LARS (CLARS eq. 3, You et al. 2017) the core expresses these as options of
:func:`lwrs.lars`, and the kit searches all their combinations:

=====================  ==================================================================
factor                 values
=====================  ==================================================================
weight_decay_form      ``sum_of_norms``: :math:`D_k = \|\bar g_k\| + \lambda\|w_k\|`;
                       ``norm_of_sum``: :math:`D_k = \|\bar g_k + \lambda w_k\|`
nesterov               Nesterov's step (CLARS eq. 4) or heavy-ball momentum
adapt                  layers with a trust ratio: ``ndim>1`` (biases excluded), ``all``,
                       or ``all_if_decay`` (all when :math:`\lambda \ne 0`, none otherwise)
decay                  layers with weight decay: ``all`` or ``ndim>1``
eps                    :math:`\epsilon` added to :math:`D_k`: 0, 1e-8 or 1e-6
larc_clip              apex LARC's clip, :math:`\gamma_k = \min(\eta\|w_k\|/D_k, \gamma_t)`
=====================  ==================================================================

For mNAG (CLARS eq. 2/4, ``kind="mnag"``) the factors are ``nesterov`` and ``decay``; for LAMB
(You et al. 2019, ``kind="lamb"``, with :math:`\beta_2 = 0.999`) they are ``adapt``, ``decay``
and Adam's ``eps`` (1e-6 or 1e-8).

For CLARS (CLARS eq. 5, ``kind="clars"``, :func:`lwrs.clars`) the factors are those of LARS,
with the denominator :math:`\frac1N S^{(1)}_k + \lambda\|w_k\|` of the exact per-sample
statistics the driver hands to every step (:meth:`~lwrs.testing.battery.Problem.norm_statistics`);
``weight_decay_form`` is ``sum_of_norms`` only, because the statistics are of the per-sample
gradients without weight decay (the paper's eq. 5).

For TVLARS (``kind="tvlars"``, :func:`lwrs.tvlars`) the factors are LARS's without ``larc_clip``,
plus ``phi``: ``as_given`` runs :math:`\phi_t = 1/(\alpha + e^{\lambda(t - d_e)}) + \gamma_{\min}`
with the hyperparameters of :data:`TVLARS_HYPERPARAMETERS` (which the driver passes), and
``official_code`` runs the official code's special case :math:`\alpha = 0.1, \gamma_{\min} = 0,
d_e = -1` with the same :math:`\lambda` (an implementation that hard-codes it).

Conventions the core does **not** express are never imitated here: the kit
names them when a trajectory diverges (see :mod:`lwrs.testing.report`). They are
the learning rate kept outside the momentum buffer (``torch.optim.SGD``'s order;
the core keeps rate-scaled steps in the buffer, CLARS eq. 4), a ratio other than
1 at a zero-gradient layer (optax and pytorch_optimizer give :math:`\eta/\lambda`),
a trust clip applied to the zero-norm ratio (timm's ``trust_clip`` with
:math:`\gamma > 1`), and weight decay skipped at zero-norm layers (apex LARC).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from ..table import spec
from .battery import Problem

__all__ = ["FACTORS", "KINDS", "LAMB_BETA2", "TVLARS_HYPERPARAMETERS", "TVLARS_OFFICIAL_CODE", "conventions",
           "reference_optimizer", "reference_run"]

FACTORS: dict[str, dict[str, tuple[Any, ...]]] = {
    "lars": {
        "weight_decay_form": ("sum_of_norms", "norm_of_sum"),
        "nesterov": (True, False),
        "adapt": ("ndim>1", "all", "all_if_decay"),
        "decay": ("all", "ndim>1"),
        "eps": (0.0, 1e-8, 1e-6),
        "larc_clip": (False, True),
    },
    "mnag": {
        "nesterov": (True, False),
        "decay": ("all", "ndim>1"),
    },
    "lamb": {
        "adapt": ("ndim>1", "all"),
        "decay": ("all", "ndim>1"),
        "eps": (1e-6, 1e-8),
    },
    "clars": {
        "weight_decay_form": ("sum_of_norms",),
        "nesterov": (True, False),
        "adapt": ("ndim>1", "all", "all_if_decay"),
        "decay": ("all", "ndim>1"),
        "eps": (0.0, 1e-8, 1e-6),
        "larc_clip": (False, True),
    },
    "tvlars": {
        "phi": ("as_given", "official_code"),
        "weight_decay_form": ("sum_of_norms", "norm_of_sum"),
        "nesterov": (True, False),
        "adapt": ("ndim>1", "all", "all_if_decay"),
        "decay": ("all", "ndim>1"),
        "eps": (0.0, 1e-8, 1e-6),
    },
}
"""Per optimizer kind, every factor and the values the core supports for it."""

KINDS = tuple(FACTORS)
"""The optimizer kinds the kit checks."""

LAMB_BETA2 = 0.999
"""LAMB's :math:`\beta_2` on every problem (:math:`\beta_1` is the problem's momentum)."""


TVLARS_HYPERPARAMETERS: dict[str, float] = {"decay_coefficient": 0.1, "delay_steps": 5.0, "alpha": 1.0,
                                             "gamma_min": 0.05}
r"""TVLARS's :math:`\lambda, d_e, \alpha, \gamma_{\min}` on every problem (the core's names): :math:`\phi_t`
falls from 0.67 to 0.25 over the 20 steps, so every hyperparameter shows in the trajectory."""

TVLARS_OFFICIAL_CODE: dict[str, float] = {"delay_steps": -1.0, "alpha": 0.1, "gamma_min": 0.0}
r"""The TVLARS official code's hard-coded :math:`d_e, \alpha, \gamma_{\min}` (convention ``phi="official_code"``)."""


def _check_kind(kind: str) -> None:
    if kind not in FACTORS:
        raise ValueError(f"the conformance kit checks {', '.join(map(repr, KINDS))}; got kind={kind!r}")


def conventions(kind: str, **fixed: Any) -> list[dict[str, Any]]:
    """Every combination of the factors of ``kind``, with the ``fixed`` ones held at one value.

    Raises ``ValueError`` naming the factor or value when ``fixed`` holds one the core does not support.

    Examples
    --------
    >>> len(conventions("lars")), len(conventions("lars", weight_decay_form="norm_of_sum"))
    (144, 72)
    >>> conventions("mnag", decay="all")
    [{'nesterov': True, 'decay': 'all'}, {'nesterov': False, 'decay': 'all'}]
    """
    _check_kind(kind)
    factors = dict(FACTORS[kind])
    for name, value in fixed.items():
        if name not in factors:
            raise ValueError(f"{kind} has no convention {name!r}; its conventions are {', '.join(factors)}")
        if value not in factors[name]:
            raise ValueError(f"{kind} convention {name}={value!r} is not one the core supports: {factors[name]}")
        factors[name] = (value,)
    return [dict(zip(factors, combo)) for combo in itertools.product(*factors.values())]


def _masks(problem: Problem, convention: Mapping[str, Any]) -> tuple[list[bool], list[bool]]:
    matrix = [len(layer.shape) > 1 for layer in problem.layers]
    adapt = {"ndim>1": matrix, "all": [True] * len(matrix),
             "all_if_decay": [problem.weight_decay != 0] * len(matrix)}[convention.get("adapt", "ndim>1")]
    decay = {"all": [True] * len(matrix), "ndim>1": matrix}[convention.get("decay", "all")]
    return adapt, decay


def reference_optimizer(kind: str, problem: Problem, convention: Mapping[str, Any]) -> Any:
    """The core's optimizer (:func:`lwrs.lars`, :func:`lwrs.clars`, ..., read from :mod:`lwrs.table`) for a
    problem under a convention.

    Examples
    --------
    >>> from lwrs.testing.battery import battery
    >>> opt = reference_optimizer("lars", battery()[0], conventions("lars")[0])
    >>> opt.name
    'lars'
    """
    _check_kind(kind)
    adapt, decay = _masks(problem, convention)
    lr = problem.learning_rates[0] if problem.constant_rate else problem.learning_rate
    factory = spec(kind).factory  # lwrs.mnag or lwrs.lars, from the optimizer table
    if kind == "lamb":
        return factory(lr, beta1=problem.beta, beta2=LAMB_BETA2, eps=convention["eps"],
                       weight_decay=problem.weight_decay, adapt_mask=adapt, weight_decay_mask=decay)
    if kind == "tvlars":
        phi = dict(TVLARS_HYPERPARAMETERS, **(TVLARS_OFFICIAL_CODE if convention["phi"] == "official_code" else {}))
        return factory(lr, **phi, beta=problem.beta, eta=problem.eta, weight_decay=problem.weight_decay,
                       weight_decay_form=convention["weight_decay_form"], eps=convention["eps"], adapt_mask=adapt,
                       weight_decay_mask=decay, nesterov=convention["nesterov"])
    if kind == "mnag":
        return factory(lr, beta=problem.beta, nesterov=convention["nesterov"], weight_decay=problem.weight_decay,
                       weight_decay_mask=decay)
    return factory(lr, beta=problem.beta, eta=problem.eta, weight_decay=problem.weight_decay,
                   weight_decay_form=convention["weight_decay_form"], eps=convention["eps"],
                   larc_clip=convention["larc_clip"], adapt_mask=adapt, weight_decay_mask=decay,
                   nesterov=convention["nesterov"])


def reference_run(kind: str, problem: Problem, convention: Mapping[str, Any],
                  xp: Any) -> Iterator[tuple[list[Any], Any]]:
    """Yield ``(params, diagnostics)`` after every step of the core's trajectory, in namespace ``xp``."""
    opt = reference_optimizer(kind, problem, convention)
    params = problem.initial_params(xp)
    state = opt.init(params)
    for t in range(problem.steps):
        stats = problem.norm_statistics(t, params) if kind == "clars" else None
        params, state, diag = opt.step(params, problem.gradients(t, params), state, norm_stats=stats)
        yield list(params), diag
