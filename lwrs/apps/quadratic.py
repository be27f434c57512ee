r"""Runs on the layered quadratic: the theorems' own method and every optimizer.

Behind ``lwrs quadratic`` and the theorem tests. Two kinds of run:

* :func:`theory_run`: mNAG (mGD for :math:`\beta = 0`) with the theorems' rates
  :math:`\gamma_k = \gamma / L_k` and i.i.d. mini-batches, recording the
  criterion :math:`\sum_k q_k \|\nabla_k f(w_t)\|^2` at every step.
* :func:`optimizer_run`: any :class:`~lwrs.Optimizer` with exact per-sample
  statistics, recording the criterion, the loss, the per-layer rates and
  whether those rates meet Theorem 2's conditions.

:func:`compare_optimizers` runs the roster over a shared grid of learning
rates (the same mini-batches for every run) and keeps each optimizer's best.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import lwrs as opt
from lwrs import NonFiniteError, layer_norms, momentum_step, per_sample_norm_statistics, zeros_like_layers
from lwrs.problems import LayeredQuadratic, sample_indices
from lwrs.schedules import warmup_polynomial
from lwrs.theory import ProblemConstants, convergence_criterion, rates_meet_theorem2

__all__ = [
    "NAMESPACES",
    "load_namespace",
    "default_problem",
    "theory_run",
    "Run",
    "optimizer_run",
    "ROSTER",
    "GRID",
    "compare_optimizers",
    "format_table",
]

NAMESPACES = {
    "numpy": "array_api_compat.numpy",
    "torch": "array_api_compat.torch",
    "array-api-strict": "array_api_strict",
    "jax": "jax.numpy",
}


def load_namespace(name: str) -> Any:
    """The array namespace of a backend, imported by name (the core itself imports none).

    Examples
    --------
    >>> load_namespace("array-api-strict").__name__
    'array_api_strict'
    """
    if name not in NAMESPACES:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(NAMESPACES)}")
    if name == "jax":
        importlib.import_module("jax").config.update("jax_enable_x64", True)
    try:
        return importlib.import_module(NAMESPACES[name])
    except ImportError as err:
        raise SystemExit(f"backend {name!r} needs a package that is not installed: {err}") from None


def default_problem(seed: int = 0) -> LayeredQuadratic:
    r"""The problem of ``lwrs quadratic``: 4 layers, :math:`L_k = 1, 4, 16, 64`, and
    :math:`M_k` growing towards the top layers (about 0.25, 4, 12, 25), as in CLARS Figure 2.

    Examples
    --------
    >>> [round(m) for m in default_problem().variance_factors]
    [0, 4, 12, 25]
    """
    return LayeredQuadratic.make(dims=(32, 32, 16, 8), scale_spread=(0.5, 2.0, 3.5, 5.0), n=2048, seed=seed)


def _criterion(problem: LayeredQuadratic, params: list[Any], lipschitz: tuple[float, ...]) -> float:
    norms = layer_norms(problem.full_grads(params))
    return convergence_criterion([float(norms[k]) ** 2 for k in range(norms.shape[0])], lipschitz)


def theory_run(
    problem: LayeredQuadratic, xp: Any, *, gamma: float, beta: float, batch_size: int, steps: int, seed: int
) -> list[float]:
    r"""mNAG with :math:`\gamma_k = \gamma/L_k` and i.i.d. batches; the criterion at :math:`t = 0..T-1`.

    .. math:: c_t = \sum_k q_k \|\nabla_k f(w_t)\|^2, \qquad
              \frac1T\sum_{t<T} c_t \text{ is the theorems' left-hand side (one sample of it).}

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> p = LayeredQuadratic.make(dims=(2, 2), lipschitz=(1.0, 4.0), n=32)
    >>> c = theory_run(p, xp, gamma=0.1, beta=0.5, batch_size=4, steps=50, seed=0)
    >>> len(c), c[-1] < c[0]
    (50, True)
    """
    rng = random.Random(seed)
    L = problem.layer_lipschitz
    rates = [gamma / lk for lk in L]
    params = problem.initial_params(xp)
    trace = zeros_like_layers(params)
    out = []
    for _ in range(steps):
        out.append(_criterion(problem, params, L))
        samples = problem.per_sample_grads(params, sample_indices(rng, problem.num_samples, batch_size, replace=True))
        grads = [xp.mean(g, axis=0) for g in samples]
        params, trace = momentum_step(params, grads, trace, rates, beta=beta)
    return out


@dataclass(frozen=True)
class Run:
    """One optimizer's run at one learning rate.

    Attributes
    ----------
    name : str
    learning_rate : float
    criteria : tuple of float
        :math:`\\sum_k q_k\\|\\nabla_k f(w_t)\\|^2` for :math:`t = 0..T` (shorter if diverged).
    losses : tuple of float
        :math:`f(w_t) - f_{\\inf}`.
    rates : tuple of tuple of float
        The per-layer rates :math:`\\gamma_k` of every step.
    admissible : tuple of bool or None
        Whether each step's rates meet Theorem 2's conditions; ``None`` for
        an optimizer the theorems do not cover (LAMB).
    diverged : bool
    """

    name: str
    learning_rate: float
    criteria: tuple[float, ...]
    losses: tuple[float, ...]
    rates: tuple[tuple[float, ...], ...]
    admissible: tuple[bool, ...] | None
    diverged: bool

    @property
    def final_loss(self) -> float:
        """:math:`f(w_T) - f_{\\inf}`, ``inf`` for a diverged run."""
        return math.inf if self.diverged else self.losses[-1]

    @property
    def mean_criterion(self) -> float:
        r"""The theorems' left-hand side for this run, :math:`\frac1T\sum_{t<T} c_t`."""
        return math.inf if self.diverged else sum(self.criteria[:-1]) / (len(self.criteria) - 1)

    @property
    def admissible_fraction(self) -> float | None:
        """The fraction of steps whose rates met Theorem 2's conditions (``None`` if not checked)."""
        if self.admissible is None:
            return None
        return sum(self.admissible) / len(self.admissible) if self.admissible else 0.0

    def steps_to(self, target: float) -> int | None:
        """First step at which the criterion is at or below ``target``, or ``None``."""
        return next((t for t, c in enumerate(self.criteria) if c <= target), None)


def optimizer_run(
    problem: LayeredQuadratic, xp: Any, optimizer: opt.Optimizer, *, name: str, learning_rate: float,
    constants: ProblemConstants | None, batch_size: int, steps: int, seed: int,
) -> Run:
    """Run ``optimizer`` with exact per-sample statistics; the batch sequence depends only on ``seed``.

    With ``constants``, every step's rates are checked against Theorem 2
    (use the optimizer's own :math:`\beta`); without, they are not.

    A run whose loss exceeds :math:`10^6 f(w_0)`, or that meets a non-finite
    value, is marked diverged.

    Examples
    --------
    >>> import array_api_compat.numpy as xp, lwrs
    >>> p = LayeredQuadratic.make(dims=(2, 2), lipschitz=(1.0, 4.0), n=32)
    >>> c = p.constants(batch_size=4, beta=0.9, steps=20, initial_gap=p.loss(p.initial_params(xp)))
    >>> fast = optimizer_run(p, xp, lwrs.mnag(0.01), name="mnag", learning_rate=0.01, constants=c,
    ...                      batch_size=4, steps=20, seed=0)
    >>> slow = optimizer_run(p, xp, lwrs.mnag(3e-4), name="mnag", learning_rate=3e-4, constants=c,
    ...                      batch_size=4, steps=20, seed=0)
    >>> len(fast.criteria), fast.admissible_fraction, slow.admissible_fraction   # 0.01 > (1-b)/(8 L_2)
    (21, 0.0, 1.0)
    """
    rng = random.Random(seed)
    L = problem.layer_lipschitz
    params = problem.initial_params(xp)
    state = optimizer.init(params)
    start = problem.loss(params)
    criteria, losses, rates, admissible = [_criterion(problem, params, L)], [start], [], []

    def finish(diverged: bool) -> Run:
        checked = tuple(admissible) if constants is not None else None
        return Run(name, learning_rate, tuple(criteria), tuple(losses), tuple(rates), checked, diverged)

    for _ in range(steps):
        samples = problem.per_sample_grads(params, sample_indices(rng, problem.num_samples, batch_size))
        grads = [xp.mean(g, axis=0) for g in samples]
        try:
            params, state, diag = optimizer.step(params, grads, state, norm_stats=per_sample_norm_statistics(samples))
        except NonFiniteError:
            return finish(True)
        step_rates = tuple(float(diag.rates[k]) for k in range(len(L)))
        rates.append(step_rates)
        if constants is not None:
            admissible.append(rates_meet_theorem2(step_rates, constants))
        losses.append(problem.loss(params))
        criteria.append(_criterion(problem, params, L))
        if not losses[-1] <= 1e6 * start:
            return finish(True)
    return finish(False)


ALL_LAYERS = lambda w: True  # noqa: E731 - the toy's layers are vectors; the default mask would skip them


@dataclass(frozen=True)
class Entry:
    """One optimizer of the comparison: how to build it for a rate and a horizon, its base rate and
    its momentum :math:`\beta` (``None`` where the theorems do not apply)."""

    name: str
    build: Callable[[float, int], opt.Optimizer]
    base_rate: float
    beta: float | None = 0.9


#: Per optimizer of :mod:`lwrs.table`: its base rate here, its keywords beyond the rate (given the
#: horizon T) and its momentum for Theorem 2. Every optimizer of the table must have an entry (a test checks).
SETTINGS: dict[str, tuple[float, Callable[[int], dict[str, Any]], float | None]] = {
    "mgd": (1.0 / 64, lambda T: {}, 0.0),
    "mnag": (1.0 / 64, lambda T: {"beta": 0.9}, 0.9),
    "lars": (10.0, lambda T: {"eta": 1e-3, "adapt_mask": ALL_LAYERS}, 0.9),
    "clars": (10.0, lambda T: {"eta": 1e-3, "adapt_mask": ALL_LAYERS}, 0.9),
    "tvlars": (10.0, lambda T: {"decay_coefficient": 10.0 / T, "delay_steps": T // 10, "eta": 1e-3,
                                "adapt_mask": ALL_LAYERS}, 0.9),
    "lamb": (0.03, lambda T: {"adapt_mask": ALL_LAYERS}, None),
}


def _entry(name: str, factory: Callable[..., opt.Optimizer]) -> Entry:
    base, keywords, beta = SETTINGS[name]
    return Entry(name, lambda lr, T: factory(lr, **keywords(T)), base, beta)


def _lars_warmup() -> Entry:
    """LARS with a polynomial warm-up over the first tenth of the run (the comparison's recipe)."""
    base, keywords, beta = SETTINGS["lars"]
    return Entry("lars+warmup", lambda lr, T: opt.lars(warmup_polynomial(lr, T // 10, T), **keywords(T)), base, beta)


#: The comparison: every optimizer of :mod:`lwrs.table` (in its order) that :data:`SETTINGS` knows,
#: plus LARS with warm-up right after LARS.
ROSTER = tuple(entry for spec in opt.table.OPTIMIZERS if spec.name in SETTINGS
               for entry in ([_entry(spec.name, spec.factory)] + ([_lars_warmup()] if spec.name == "lars" else [])))
GRID = tuple(3.0**j for j in range(-3, 4))  # 1/27 ... 27 times the base rate


def compare_optimizers(
    problem: LayeredQuadratic, xp: Any, *, batch_size: int, steps: int, seed: int,
    progress: Callable[[Iterable], Iterable] = iter,
) -> list[Run]:
    """Run every optimizer of :data:`ROSTER` over :data:`GRID`; return each one's best run.

    The best run has the smallest final :math:`f(w_T) - f_{\\inf}`. Every run
    sees the same mini-batches; each run's rates are checked against Theorem 2
    with its own :math:`\beta`.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> runs = compare_optimizers(default_problem(), xp, batch_size=16, steps=10, seed=0)
    >>> [r.name for r in runs] == [e.name for e in ROSTER]
    True
    """
    if steps < 10:
        raise ValueError(f"steps must be at least 10, got {steps}")
    if not 1 <= batch_size <= problem.num_samples:
        raise ValueError(f"batch_size must lie in [1, {problem.num_samples}], got {batch_size}")
    start = problem.loss(problem.initial_params(xp))
    best: dict[str, Run] = {}
    for entry, lr in progress([(e, e.base_rate * g) for e in ROSTER for g in GRID]):
        constants = None if entry.beta is None else problem.constants(
            batch_size=batch_size, beta=entry.beta, steps=steps, initial_gap=start)
        run = optimizer_run(problem, xp, entry.build(lr, steps), name=entry.name, learning_rate=lr,
                            constants=constants, batch_size=batch_size, steps=steps, seed=seed)
        if entry.name not in best or run.final_loss < best[entry.name].final_loss:
            best[entry.name] = run
    return [best[e.name] for e in ROSTER]


def format_table(runs: list[Run], target: float) -> str:
    """A plain-text table of runs: rate, criterion, loss, steps to ``target``, admissible steps.

    Examples
    --------
    >>> r = Run("x", 0.1, (4.0, 1.0, 0.5), (2.0, 1.0, 0.2), ((0.1,), (0.1,)), (True, False), False)
    >>> print(format_table([r], 1.0).splitlines()[2])
    x                    0.1         2.5     0.2                   1      50%
    """
    header = (f"{'optimizer':<14} {'lr':>9} {'criterion':>11} {'f - f*':>7} "
              f"{'steps to target':>19} {'Thm 2 ok':>8}")
    lines = [header, "-" * len(header)]
    for r in runs:
        reached = r.steps_to(target)
        share = "n/a" if r.admissible_fraction is None else f"{r.admissible_fraction:.0%}"
        lines.append(
            f"{r.name:<14} {r.learning_rate:>9.3g} {r.mean_criterion:>11.4g} {r.final_loss:>7.3g} "
            f"{(str(reached) if reached is not None else 'never'):>19} {share:>8}"
        )
    return "\n".join(lines)
