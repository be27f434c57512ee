r"""Compare a trajectory with the core's under every convention, and say what matches.

The error of layer :math:`k` after step :math:`t` is

.. math::

    e_{t,k} = \frac{\|w^{\mathrm{got}}_{t,k} - w^{\mathrm{core}}_{t,k}\|_2}
                   {\max(\|w^{\mathrm{core}}_{t,k}\|_2,\ 1)} ,

a relative error with a floor of 1 (the problems are of unit scale, so zero
layers are compared absolutely). A convention *matches* a problem when every
:math:`e_{t,k}` stays within the tolerance; the first :math:`(t, k)` beyond it is
where the trajectory *diverges*. The best convention matches the most problems,
then the most steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .battery import Problem
from .conventions import conventions, reference_run

__all__ = ["Divergence", "ProblemResult", "ConventionResult", "Report", "compare", "to_floats"]

Trajectory = Sequence[Sequence[Sequence[float]]]  # [step][layer] -> flat floats after that step


def to_floats(x: Any) -> tuple[float, ...]:
    """The values of an array, flattened, as Python floats (any array-API library)."""
    from array_api_compat import array_namespace

    xp = array_namespace(x)
    flat = xp.reshape(x, (-1,))
    return tuple(float(flat[i]) for i in range(flat.shape[0]))


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _norm(a: Sequence[float]) -> float:
    return math.sqrt(sum(x * x for x in a))


def _fmt(values: Sequence[float], limit: int = 4) -> str:
    shown = ", ".join(f"{v:.6g}" for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


@dataclass(frozen=True)
class Divergence:
    """Where a trajectory first leaves the core's: problem, step, layer, and the values."""

    problem: str
    step: int
    layer: int
    layer_name: str
    expected: tuple[float, ...]
    got: tuple[float, ...]
    error: float
    note: str = ""

    def describe(self) -> str:
        """One readable paragraph: where, how far, the values, and what the step implies."""
        if self.layer < 0:  # the implementation raised: no layer to blame
            return f"problem {self.problem!r}, step {self.step}: {self.note}"
        text = (f"problem {self.problem!r}, step {self.step}, layer {self.layer} {self.layer_name!r}: "
                f"relative error {self.error:.3g}; expected {_fmt(self.expected)}, got {_fmt(self.got)}")
        return text + (f"; {self.note}" if self.note else "")


@dataclass(frozen=True)
class ProblemResult:
    """One convention on one problem: matched or not, the largest error seen, the divergence."""

    problem: str
    matched: bool
    steps_matched: int
    max_error: float
    divergence: Divergence | None


@dataclass(frozen=True)
class ConventionResult:
    """One convention on the whole battery."""

    convention: dict[str, Any]
    problems: tuple[ProblemResult, ...]

    @property
    def matched(self) -> int:
        """Number of problems on which this convention matches."""
        return sum(r.matched for r in self.problems)

    @property
    def max_error(self) -> float:
        """Largest error over the matched problems."""
        return max((r.max_error for r in self.problems if r.matched), default=0.0)

    @property
    def first_divergence(self) -> Divergence | None:
        """The earliest divergence over the problems (by step, then battery order)."""
        found = [r.divergence for r in self.problems if r.divergence is not None]
        return min(found, key=lambda d: d.step, default=None)

    @property
    def score(self) -> tuple[int, int]:
        return self.matched, sum(r.steps_matched for r in self.problems)

    def label(self) -> str:
        """The convention as ``factor=value`` pairs."""
        return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in self.convention.items())


def _implied_ratio_note(problem: Problem, k: int, initial: Sequence[float], got: Sequence[float],
                        expected: Sequence[float], diag: Any) -> str:
    """On a first step, how the got step compares with the core's, as an implied trust ratio."""
    d_exp = [e - w for e, w in zip(expected, initial)]
    d_got = [g - w for g, w in zip(got, initial)]
    if _norm(d_exp) == 0.0:
        return "the core leaves this layer unchanged on the first step" if _norm(d_got) else ""
    rho = sum(a * b for a, b in zip(d_got, d_exp)) / sum(a * a for a in d_exp)
    if _dist([rho * a for a in d_exp], d_got) > 1e-6 * max(_norm(d_got), 1e-300):
        return "the step points in another direction than the core's"
    b = problem.beta
    if b and abs(rho - (1 + b)) <= 1e-9 * (1 + b):
        return f"the step is {rho:.6g} = 1 + beta times the core's: Nesterov's first step against heavy-ball's"
    if b and abs(rho * (1 + b) - 1) <= 1e-9:
        return f"the step is {rho:.6g} = 1/(1 + beta) times the core's: heavy-ball's first step against Nesterov's"
    ratios = getattr(diag, "trust_ratios", None)
    core_ratio = float(ratios[k]) if ratios is not None else 1.0
    implied = rho * core_ratio
    named = {"1": 1.0, "0 (the layer is not updated)": 0.0, "1/lr": 1.0 / problem.learning_rates[0]}
    if problem.weight_decay:
        named["eta/lambda" if problem.eta != 1 else "1/lambda"] = problem.eta / problem.weight_decay
    names = [n for n, v in named.items() if abs(implied - v) <= 1e-6 * max(abs(v), 1.0)]
    where = f" (= {names[0]})" if names else ""
    return f"the step is {rho:.6g} times the core's: implied trust ratio {implied:.6g}{where}, core's {core_ratio:.6g}"


def _compare_one(kind: str, problem: Problem, convention: Mapping[str, Any], got: Trajectory, xp: Any,
                 tolerance: float, failure: str = "") -> ProblemResult:
    worst = 0.0
    initial = None
    for t, (params, diag) in enumerate(reference_run(kind, problem, convention, xp)):
        if t >= len(got):  # the implementation stopped: it raised at this step
            note = failure or "the implementation returned no weights for this step"
            div = Divergence(problem.name, t, -1, "", (), (), math.inf, note)
            return ProblemResult(problem.name, False, t, math.inf, div)
        for k, layer in enumerate(problem.layers):
            expected = to_floats(params[k])
            error = _dist(got[t][k], expected) / max(_norm(expected), 1.0)
            if not error <= tolerance:  # also catches nan
                note = ""
                if t == 0:
                    initial = layer.init
                    note = _implied_ratio_note(problem, k, initial, got[t][k], expected, diag)
                div = Divergence(problem.name, t, k, layer.name, expected, tuple(got[t][k]), error, note)
                return ProblemResult(problem.name, False, t, max(worst, error), div)
            worst = max(worst, error)
    return ProblemResult(problem.name, True, problem.steps, worst, None)


@dataclass
class Report:
    """What the kit found: every convention's result on the battery, best first.

    Attributes
    ----------
    kind : str
        The optimizer checked against, ``"lars"`` or ``"mnag"``.
    candidate : str
        A name for the implementation under test.
    tolerance : float
    problems : tuple of Problem
    results : list of ConventionResult
        Best first.
    """

    kind: str
    candidate: str
    tolerance: float
    problems: tuple[Problem, ...]
    results: list[ConventionResult]
    diagnoses: list[str] = field(default_factory=list)

    @property
    def best(self) -> ConventionResult:
        """The convention that matches the most problems, then the most steps."""
        return self.results[0]

    @property
    def matching(self) -> list[ConventionResult]:
        """The conventions that match every problem."""
        return [r for r in self.results if r.matched == len(self.problems)]

    @property
    def conforms(self) -> bool:
        """Whether some convention of the core matches every problem."""
        return bool(self.matching)

    def factor_values(self, problems: Sequence[str] | None = None) -> dict[str, list[Any]]:
        """Per factor, the values found in the conventions that match ``problems`` (all by default).

        A factor with every value of the core listed is one the battery cannot tell apart for this candidate.
        """
        wanted = set(problems) if problems is not None else {p.name for p in self.problems}
        ok = [r for r in self.results if all(pr.matched for pr in r.problems if pr.problem in wanted)]
        out: dict[str, list[Any]] = {}
        for r in ok:
            for name, value in r.convention.items():
                out.setdefault(name, [])
                if value not in out[name]:
                    out[name].append(value)
        return out

    def matched_problems(self) -> list[str]:
        """Problems the best convention matches."""
        return [r.problem for r in self.best.problems if r.matched]

    def text(self) -> str:
        """The report as plain text (what ``python -m lwrs.testing`` prints)."""
        n = len(self.problems)
        lines = [f"{self.candidate}: conformance with lwrs.{self.kind} "
                 f"({n} float64 problems, {self.problems[0].steps} steps, tolerance {self.tolerance:g})"]
        if self.conforms:
            lines.append(f"CONFORMS: {len(self.matching)} of the core's conventions match every problem.")
        else:
            lines.append(f"DOES NOT CONFORM: the closest convention matches {self.best.matched} of {n} problems.")
        lines.append(f"closest convention: {self.best.label()}")
        lines.append(f"  largest error on the matched problems: {self.best.max_error:.2g}")
        for r in self.best.problems:
            d = r.divergence
            status = ("match" if d is None else f"raises at step {d.step}" if d.layer < 0
                      else f"diverges at step {d.step}, layer {d.layer_name!r}")
            lines.append(f"  {r.problem:<17} {status}")
        div = self.best.first_divergence
        if div is not None:
            lines.append("first divergence: " + div.describe())
        values = self.factor_values(self.matched_problems())
        if values:
            lines.append("conventions consistent with the matched problems:")
            for name, vals in values.items():
                lines.append(f"  {name}: {', '.join(map(repr, vals))}")
        if self.diagnoses:
            lines.append("diagnosis:")
            lines.extend(f"  - {d}" for d in self.diagnoses)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()


def _diagnoses(report: Report) -> list[str]:
    best = report.best
    out = []
    by_name = {p.name: p for p in report.problems}
    constant = [r for r in best.problems if by_name[r.problem].constant_rate]
    varying = [r for r in best.problems if not by_name[r.problem].constant_rate]
    failing = [r for r in varying if not r.matched]
    if constant and all(r.matched for r in constant) and failing:
        # the order of rate and buffer cannot show at the first step (the buffer is empty): a divergence there is
        # the rate itself
        if any(r.divergence is not None and r.divergence.step == 0 for r in failing):
            out.append("every constant-rate problem matches but a varying rate does not, from the first step on: the "
                       "rate of a step differs from the schedule's at that step (is the schedule evaluated at "
                       "another step, e.g. t + 1?).")
        else:
            out.append("every constant-rate problem matches but a varying rate does not: the learning rate sits "
                       "outside the momentum buffer (torch.optim.SGD's order). The core keeps rate-scaled steps in "
                       "the buffer (CLARS eq. 4, optax's order) and has no option for the other order.")
    for r in best.problems:
        d = r.divergence
        if d is None or not d.note:
            continue
        if d.layer < 0:
            out.append(f"{d.problem}, step {d.step}: {d.note}.")
            continue
        role = by_name[d.problem].layers[d.layer].role
        ratio = "eta/lambda" if by_name[d.problem].eta != 1 else "1/lambda"
        if f"(= {ratio})" in d.note and role == "zero_gradient":
            out.append(f"{d.problem}: at a layer with a zero gradient the ratio is {ratio} (the formula applied where "
                       "only the weight-decay term is left); the core uses 1 there (timm's convention) and has no "
                       f"option for {ratio}.")
        elif "1/lr" in d.note and role == "zero_init":
            out.append(f"{d.problem}: at a zero-norm layer the ratio 1 is divided by the learning rate and clipped "
                       "(timm's trust_clip with lr > 1); the core's LARC clip leaves the zero-norm ratio at 1.")
        elif "not updated" in d.note and role == "zero_gradient":
            out.append(f"{d.problem}: layer {d.layer_name!r} is not updated where the core applies weight decay "
                       "(apex LARC skips weight decay where a norm is zero); the core has no option for that.")
        else:
            out.append(f"{d.problem}, layer {d.layer_name!r}: {d.note}.")
    return out


def compare(kind: str, candidate: str, trajectories: Mapping[str, Trajectory], problems: Sequence[Problem], *,
            xp: Any, tolerance: float = 1e-10, fixed: Mapping[str, Any] | None = None,
            failures: Mapping[str, str] | None = None) -> Report:
    """Compare a candidate's trajectories with the core under every convention of ``kind``.

    ``trajectories[problem.name][t][k]`` holds layer ``k``'s values after step
    ``t``, flattened; ``xp`` is the namespace the core runs in; ``fixed`` holds
    conventions that are not searched; ``failures[problem.name]`` says why a
    trajectory stops early (the implementation raised).
    """
    failures = dict(failures or {})
    results = []
    for convention in conventions(kind, **dict(fixed or {})):
        per_problem = tuple(_compare_one(kind, p, convention, trajectories[p.name], xp, tolerance,
                                         failures.get(p.name, "")) for p in problems)
        results.append(ConventionResult(convention, per_problem))
    results.sort(key=lambda r: r.score, reverse=True)  # stable: ties keep the core's order of conventions
    report = Report(kind, candidate, tolerance, tuple(problems), results)
    report.diagnoses = _diagnoses(report)
    return report
