r"""The demo behind ``lwrs demo``: every optimizer on one toy problem, one table.

Each optimizer runs on the same :class:`~lwrs.problems.LayeredQuadratic`,
with the same sequence of mini-batches, for each learning rate of a small
log-spaced grid around its own base rate; the table reports the best rate's
run. CLARS gets exact per-sample statistics from the problem's per-sample
gradients. A run whose loss exceeds :math:`10^6 f(w_0)` is marked diverged.
"""

from __future__ import annotations

import importlib
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from . import optimizers as opt
from ._validation import NonFiniteError
from .problems import LayeredQuadratic, sample_indices
from .schedules import warmup_polynomial
from .statistics import per_sample_norm_statistics

__all__ = ["DemoRun", "ROSTER", "load_namespace", "run_demo", "format_table"]

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


@dataclass(frozen=True)
class Entry:
    """One optimizer of the demo: how to build it for a rate, and its base rate."""

    name: str
    build: Callable[[float, int], opt.Optimizer]
    base_rate: float


ALL = lambda w: True  # noqa: E731 - the toy's layers are vectors; the default mask would skip them

ROSTER = (
    Entry("mgd", lambda lr, T: opt.mgd(lr), 1.0 / 64),
    Entry("mnag", lambda lr, T: opt.mnag(lr, beta=0.9), 1.0 / 64),
    Entry("lars", lambda lr, T: opt.lars(lr, eta=1e-3, beta=0.9, adapt_mask=ALL), 10.0),
    Entry("lars+warmup", lambda lr, T: opt.lars(warmup_polynomial(lr, T // 10, T), eta=1e-3, beta=0.9, adapt_mask=ALL), 10.0),
    Entry("clars", lambda lr, T: opt.clars(lr, eta=1e-3, beta=0.9, adapt_mask=ALL), 10.0),
    Entry("tvlars", lambda lr, T: opt.tvlars(lr, decay=10.0 / T, delay_steps=T // 10, eta=1e-3, beta=0.9, adapt_mask=ALL), 10.0),
    Entry("lamb", lambda lr, T: opt.lamb(lr, adapt_mask=ALL), 0.03),
)
GRID = tuple(3.0**j for j in range(-3, 4))  # 1/27 ... 27 times the base rate


@dataclass(frozen=True)
class DemoRun:
    """The outcome of one optimizer at one learning rate."""

    name: str
    learning_rate: float
    losses: tuple[float, ...]
    diverged: bool
    final_rates: tuple[float, ...]
    final_clars_factors: tuple[float, ...]

    @property
    def final_loss(self) -> float:
        return self.losses[-1] if not self.diverged else math.inf

    def steps_to(self, target: float) -> int | None:
        """First step at which the loss is at or below ``target``, or ``None``."""
        return next((t for t, f in enumerate(self.losses) if f <= target), None)


def run_one(
    entry: Entry, lr: float, problem: LayeredQuadratic, xp: Any, steps: int, batch_size: int, seed: int
) -> DemoRun:
    """Run one optimizer at one rate; the batch sequence depends only on ``seed``."""
    optimizer = entry.build(lr, steps)
    rng = random.Random(seed)
    params = problem.initial_params(xp)
    state = optimizer.init(params)
    start = problem.loss(params)
    losses = [start]
    diag = None
    for _ in range(steps):
        samples = problem.per_sample_grads(params, sample_indices(rng, problem.num_samples, batch_size))
        grads = [xp.mean(g, axis=0) for g in samples]
        try:
            params, state, diag = optimizer.step(params, grads, state, norm_stats=per_sample_norm_statistics(samples))
        except NonFiniteError:
            return DemoRun(entry.name, lr, tuple(losses), True, (), ())
        losses.append(problem.loss(params))
        if not losses[-1] <= 1e6 * start:
            return DemoRun(entry.name, lr, tuple(losses), True, (), ())
    records = diag.as_records()
    return DemoRun(
        entry.name, lr, tuple(losses), False,
        tuple(r["rate"] for r in records), tuple(r["clars_factor"] for r in records),
    )


def run_demo(
    xp: Any, *, steps: int = 300, batch_size: int = 64, seed: int = 0, progress: Callable[[Iterable], Iterable] = iter
) -> tuple[LayeredQuadratic, list[DemoRun]]:
    r"""Run every optimizer of :data:`ROSTER` over the rate grid; return the best run of each.

    The best run minimises the final :math:`f(w_T) - f_{\inf}`.

    Examples
    --------
    >>> import array_api_compat.numpy as xp
    >>> problem, runs = run_demo(xp, steps=10, batch_size=16)
    >>> [r.name for r in runs] == [e.name for e in ROSTER]
    True
    >>> print(format_table(runs, problem.loss(problem.initial_params(xp))).splitlines()[0].split()[:3])
    ['optimizer', 'best', 'lr']
    """
    if steps < 10:
        raise ValueError(f"steps must be at least 10, got {steps}")
    problem = LayeredQuadratic.make(seed=seed)
    if not 1 <= batch_size <= problem.num_samples:
        raise ValueError(f"batch_size must lie in [1, {problem.num_samples}], got {batch_size}")
    jobs = [(entry, entry.base_rate * g) for entry in ROSTER for g in GRID]
    best: dict[str, DemoRun] = {}
    for entry, lr in progress(jobs):
        run = run_one(entry, lr, problem, xp, steps, batch_size, seed)
        if entry.name not in best or run.final_loss < best[entry.name].final_loss:
            best[entry.name] = run
    return problem, [best[e.name] for e in ROSTER]


def format_table(runs: list[DemoRun], start_loss: float) -> str:
    """A plain-text table of the best run of every optimizer."""
    target = 1e-2 * start_loss
    header = f"{'optimizer':<12} {'best lr':>9} {'final f - f*':>13} {'steps to 1% of f(w0)':>21} {'top-layer rate':>15} {'top CLARS factor':>17}"
    lines = [header, "-" * len(header)]
    for r in runs:
        reached = r.steps_to(target)
        top_rate = f"{r.final_rates[-1]:.3g}" if r.final_rates else "-"
        top_factor = f"{r.final_clars_factors[-1]:.3f}" if r.final_clars_factors else "-"
        lines.append(
            f"{r.name:<12} {r.learning_rate:>9.3g} {r.final_loss:>13.4g} "
            f"{(str(reached) if reached is not None else 'never'):>21} {top_rate:>15} {top_factor:>17}"
        )
    return "\n".join(lines)
