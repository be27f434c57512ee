r"""The verdict rules of the tuned protocol (``protocol`` 2 of ``lwrs reproduce``), fixed before its run.

Every comparison is *paired across seeds*: seed :math:`s` gives both methods the
same initial weights and the same batch order, so the per-seed differences
:math:`d_s = a_s - b_s` carry the effect without the seed-to-seed spread of
either method. A comparison **holds** when all of

* the mean difference :math:`\bar d` is positive (in the claimed direction);
* a one-sided paired t-test (:func:`scipy.stats.ttest_rel`) gives
  :math:`p < 0.05`;
* the effect is beyond the spread and not negligible:
  :math:`\bar d > \operatorname{sd}(d)` and :math:`\bar d \ge` 1 point of accuracy.

A claim is *reproduced* when the comparisons it rests on hold, *partly
reproduced* when some do, and *not reproduced* otherwise; each verdict names its
evidence (means, paired effect ± its standard deviation, p-value).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["paired", "fig1_verdicts", "fig3_verdict", "table1_verdicts", "ALPHA", "MIN_EFFECT", "MIN_SEEDS", "LEARNED"]

#: The significance level of the one-sided paired t-test.
ALPHA = 0.05
#: The smallest effect that counts, in accuracy (1 percentage point).
MIN_EFFECT = 0.01


def _verdict(strong: bool, weak: bool) -> str:
    return "reproduced" if strong else ("partly reproduced" if weak else "not reproduced")


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    r"""Does ``a`` beat ``b``, paired by seed? The effect :math:`\bar d`, its spread, the p-value and the decision.

    ``a[s]`` and ``b[s]`` are the same seed's results. See the module docstring
    for the rule (one-sided paired t-test, :math:`p < 0.05`, :math:`\bar d > \operatorname{sd}(d)`,
    :math:`\bar d \ge 0.01`).

    Examples
    --------
    >>> r = paired([0.80, 0.82, 0.81, 0.83, 0.80], [0.70, 0.71, 0.72, 0.70, 0.71])
    >>> r["holds"], round(r["effect"], 3)
    (True, 0.104)
    >>> paired([0.80, 0.70, 0.82, 0.69, 0.81], [0.75, 0.76, 0.74, 0.75, 0.77])["holds"]  # within the spread
    False
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired needs two equal-length samples of at least 2 seeds, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    effect, spread = statistics.fmean(d), statistics.stdev(d)
    if spread <= 1e-9:  # identical differences (up to rounding): no spread to test against
        p = 0.0 if effect > 0 else 1.0
    else:
        from scipy import stats

        p = float(stats.ttest_rel(a, b, alternative="greater").pvalue)
    holds = effect > 0 and p < ALPHA and effect > spread and effect >= MIN_EFFECT
    return {"effect": effect, "spread": spread, "p": p, "holds": bool(holds)}


def _say(name_a: str, name_b: str, r: dict[str, Any]) -> str:
    return (f"{name_a} − {name_b} {100 * r['effect']:+.1f} ± {100 * r['spread']:.1f} pts "
            f"(paired, p = {r['p']:.2g}{'' if r['holds'] else ', does not hold'})")


def _by_seed(s: dict[str, Any], label: str, key: str = "by_seed") -> list[float]:
    return list(s[label][key])


def fig1_verdicts(s: dict[str, Any], batches: Sequence[int], budgets: Sequence[str]) -> list[dict[str, str]]:
    """CLARS Figure 1 under each budget: tuned LARS against tuned mNAG, at the largest batch and in the gap's growth.

    ``s`` maps ``"{budget}/{method}/B{b}"`` to a summary with ``by_seed``
    (final test accuracy per seed). Reproduced if LARS beats mNAG at the largest
    batch *and* the gap grows from the smallest batch (both paired); partly if one holds.

    Examples
    --------
    >>> s = {f"epochs/{m}/B{b}": {"by_seed": [v + 0.002 * i for i in range(5)]}
    ...      for m, b, v in [("lars", 128, .9), ("mnag", 128, .9), ("lars", 8192, .6), ("mnag", 8192, .2)]}
    >>> fig1_verdicts(s, (128, 8192), ("epochs",))[0]["verdict"]
    'reproduced'
    """
    out = []
    small, big = min(batches), max(batches)
    for budget in budgets:
        lars_big, mnag_big = _by_seed(s, f"{budget}/lars/B{big}"), _by_seed(s, f"{budget}/mnag/B{big}")
        lars_small, mnag_small = _by_seed(s, f"{budget}/lars/B{small}"), _by_seed(s, f"{budget}/mnag/B{small}")
        at_big = paired(lars_big, mnag_big)
        grows = paired([x - y for x, y in zip(lars_big, mnag_big)], [x - y for x, y in zip(lars_small, mnag_small)])
        gaps = "; ".join(f"B={b}: LARS {_pct(s[f'{budget}/lars/B{b}'])} vs mNAG {_pct(s[f'{budget}/mnag/B{b}'])}"
                         for b in batches)
        out.append({"claim": f"LARS beats mNAG as the batch grows (CLARS Figure 1), {budget} budget",
                    "rule": "both tuned on validation; reproduced if LARS beats mNAG at the largest B and the "
                            "LARS−mNAG gap grows from the smallest B, both by the paired rule; partly if one holds",
                    "evidence": f"at B={big}: {_say('LARS', 'mNAG', at_big)}; gap growth B={small}→{big}: "
                                f"{_say('gap', 'gap', grows)}; {gaps}",
                    "verdict": _verdict(at_big["holds"] and grows["holds"], at_big["holds"] or grows["holds"])})
    return out


def _pct(entry: dict[str, Any]) -> str:
    v = entry["by_seed"]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.fmean(v):.1f} ± {100 * sd:.1f}"


#: A model (or Table 1 cell) run with fewer seeds is reported, not judged: too few pairs for the paired rule.
MIN_SEEDS = 3

#: Below this final accuracy (ten classes: chance is 10%) a model did not learn, and its comparison says nothing.
LEARNED = 0.2


def fig3_verdict(s: dict[str, Any], models: Sequence[str], rivals: Sequence[str]) -> dict[str, str]:
    """CLARS Figure 3: CLARS against each rival on the early-training accuracy (``early_by_seed``), per model.

    Reproduced if CLARS beats every rival by the paired rule in every model whose
    best method learned (final accuracy ≥ 20%); partly if it beats at least one
    rival somewhere; a model where nothing learned, or run with fewer than
    :data:`MIN_SEEDS` seeds, is named and does not count.

    Examples
    --------
    >>> s = {f"mlp/{m}": {"early_by_seed": [v + 0.003 * i for i in range(5)], "by_seed": [0.9] * 5}
    ...      for m, v in [("clars", 0.6), ("mnag-warmup", 0.4), ("lars-warmup", 0.595)]}
    >>> fig3_verdict(s, ("mlp",), ("mnag-warmup", "lars-warmup"))["verdict"]
    'partly reproduced'
    """
    strong, weak, lines, judged = True, False, [], 0
    for model in models:
        labels = [f"{model}/{m}" for m in ("clars", *rivals)]
        best = max(statistics.fmean(s[label]["by_seed"]) for label in labels)
        if len(s[labels[0]]["by_seed"]) < MIN_SEEDS:
            lines.append(f"{model}: {len(s[labels[0]]['by_seed'])} seeds, reported but not judged")
            continue
        if best < LEARNED:
            lines.append(f"{model}: no method learned (best final accuracy {100 * best:.1f}%), not judged")
            continue
        judged += 1
        clars = _by_seed(s, f"{model}/clars", "early_by_seed")
        results = {m: paired(clars, _by_seed(s, f"{model}/{m}", "early_by_seed")) for m in rivals}
        strong &= all(r["holds"] for r in results.values())
        weak |= any(r["holds"] for r in results.values())
        lines.append(f"{model}: " + ", ".join(_say("CLARS", m, r) for m, r in results.items()))
    return {"claim": "CLARS beats warm-up and FC-layer freezing early in training (CLARS Figure 3)",
            "rule": "mean test accuracy over the warm-up window and as long again, each method at its rate tuned on "
                    "validation; reproduced if CLARS beats every rival by the paired rule in every model that "
                    "learned; partly if it beats at least one somewhere",
            "evidence": "; ".join(lines), "verdict": _verdict(strong and judged > 0, weak)}


def table1_verdicts(s: dict[str, Any], batches: Sequence[int], budgets: Sequence[str],
                    models: Sequence[str] = ("mlp",)) -> list[dict[str, str]]:
    """TVLARS Table 1 under each budget: tuned TVLARS against the better of tuned LARS and LAMB with warm-up.

    ``s`` maps ``"{budget}/{model}/{method}/B{b}"`` to summaries with ``by_seed``.
    Reproduced if TVLARS beats the better rival (by mean) by the paired rule in at
    least two thirds of the (model, B) cells run with at least :data:`MIN_SEEDS`
    seeds; partly if in at least one.

    Examples
    --------
    >>> s = {f"epochs/mlp/{m}/B{b}": {"by_seed": [v + 0.003 * i for i in range(5)]}
    ...      for b in (512, 1024) for m, v in [("tvlars", 0.8), ("lars-warmup", 0.7), ("lamb-warmup", 0.6)]}
    >>> table1_verdicts(s, (512, 1024), ("epochs",))[0]["verdict"]
    'reproduced'
    """
    out = []
    for budget in budgets:
        wins, cells, lines = 0, 0, []
        for model in models:
            for b in batches:
                key = f"{budget}/{model}/{{}}/B{b}"
                if key.format("tvlars") not in s:
                    continue
                if len(s[key.format("tvlars")]["by_seed"]) < MIN_SEEDS:
                    lines.append(f"{model} B={b}: {len(s[key.format('tvlars')]['by_seed'])} seeds, not judged")
                    continue
                rival = max(("lars-warmup", "lamb-warmup"), key=lambda m: statistics.fmean(s[key.format(m)]["by_seed"]))
                r = paired(_by_seed(s, key.format("tvlars")), _by_seed(s, key.format(rival)))
                cells += 1
                wins += r["holds"]
                lines.append(f"{model} B={b}: {_say('TVLARS', rival, r)}")
        share = wins / cells if cells else 0.0
        out.append({"claim": f"TVLARS beats LARS and LAMB with warm-up (TVLARS Table 1), {budget} budget",
                    "rule": "each method at its setting tuned on validation; reproduced if TVLARS beats the better of "
                            "LARS and LAMB by the paired rule in at least two thirds of the (model, B) cells; partly "
                            "if in at least one",
                    "evidence": "; ".join(lines) + f" (TVLARS ahead by the rule in {wins} of {cells})",
                    "verdict": _verdict(cells > 0 and share >= 2 / 3, wins >= 1)})
    return out

