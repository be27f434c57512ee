"""The verdicts of ``lwrs reproduce``: one per paper claim, by rules fixed in code before the runs.

The claims are CLARS Figures 1–3 and TVLARS Table 1; each verdict is *reproduced*,
*partly reproduced* or *not reproduced* at this scale, with the numbers behind it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .experiments import Preset

__all__ = ["verdicts"]


def _verdict(strong: bool, weak: bool) -> str:
    return "reproduced" if strong else ("partly reproduced" if weak else "not reproduced")


def _fig1_verdict(s: dict[str, Any], batches: Sequence[int]) -> dict[str, str]:
    gaps = {b: s[f"lars/B{b}"]["accuracy"][0] - s[f"mnag/B{b}"]["accuracy"][0] for b in batches}
    big = max(batches)
    noise = s[f"lars/B{big}"]["accuracy"][1] + s[f"mnag/B{big}"]["accuracy"][1]
    wins_large = gaps[big] > noise
    grows = gaps[big] > gaps[min(batches)]
    evidence = "; ".join(f"B={b}: LARS−mNAG {100 * g:+.1f} pts" for b, g in gaps.items())
    return {"claim": "LARS beats mNAG as the batch grows (CLARS Figure 1)",
            "rule": "reproduced if LARS beats mNAG at the largest B by more than the two stds and the gap "
                    "grows from the smallest B; partly if one of the two holds",
            "evidence": evidence, "verdict": _verdict(wins_large and grows, wins_large or grows)}


def _fig2_verdict(curves: dict[str, Any], early: int = 3) -> dict[str, str]:
    checks, lines = [], []
    for label, c in curves.items():
        rows = [r for r in c["ratio"][1:early + 1] if r]
        if not rows:
            continue
        mean = [statistics.fmean(col) for col in zip(*rows)]
        top_over_bottom = mean[-1] / mean[0]
        upper = statistics.fmean(mean[len(mean) // 2:]) > statistics.fmean(mean[:len(mean) // 2])
        checks.append((top_over_bottom > 1, upper))
        lines.append(f"{label}: epochs 1–{early} mean ratio by layer " + ", ".join(f"{v:.3g}" for v in mean)
                     + f" (last/first {top_over_bottom:.3g})")
    strong = bool(checks) and all(a and b for a, b in checks)
    weak = any(a or b for a, b in checks)
    return {"claim": "M_k is larger in the top layers early in training (CLARS Figure 2)",
            "rule": f"reproduced if, averaged over epochs 1–{early}, the last layer's ratio exceeds the first's and "
                    "the upper half of the layers exceeds the lower half, in every model and rate; partly if any "
                    "of these holds somewhere",
            "evidence": "; ".join(lines), "verdict": _verdict(strong, weak)}


def _fig3_verdict(s: dict[str, Any], models: Sequence[str], window: int) -> dict[str, str]:
    strong, weak, lines = True, False, []
    for model in models:
        def early(method: str) -> tuple[float, float]:
            curve = s[f"{model}/{method}"]["accuracy_curve"][1:2 * window + 1]
            return statistics.fmean(m for m, _ in curve), statistics.fmean(sd for _, sd in curve)

        clars = early("clars")
        rivals = {m: early(m) for m in ("mnag-warmup", "mnag-freeze", "lars-warmup")}
        beats = {m: clars[0] - r[0] > clars[1] + r[1] for m, r in rivals.items()}
        ahead = {m: clars[0] > r[0] for m, r in rivals.items()}
        strong &= all(beats.values())
        weak |= any(ahead.values())
        lines.append(f"{model}: mean test accuracy over epochs 1–{2 * window}: CLARS {100 * clars[0]:.1f}, "
                     + ", ".join(f"{m} {100 * r[0]:.1f}" for m, r in rivals.items()))
    return {"claim": "CLARS beats warm-up and FC-layer freezing early in training (CLARS Figure 3)",
            "rule": f"reproduced if CLARS's mean test accuracy over the first {2 * window} epochs beats mNAG with "
                    "warm-up, mNAG with FC freezing and LARS with warm-up by more than the two stds, in every "
                    "model; partly if it is ahead of at least one on the mean",
            "evidence": "; ".join(lines), "verdict": _verdict(strong, weak)}


def _table1_best(s: dict[str, Any], batches: Sequence[int]) -> dict[str, dict[int, tuple[str, float, float]]]:
    """Per method and batch size, the best setting (label, mean, std) over the swept learning rates (and λ)."""
    best: dict[str, dict[int, tuple[str, float, float]]] = {}
    for method in ("lars-warmup", "lamb-warmup", "tvlars"):
        best[method] = {}
        for b in batches:
            cands = [(label, *v["accuracy"]) for label, v in s.items() if label.startswith(f"{method}/B{b}/")]
            best[method][b] = max(cands, key=lambda c: (c[1], -c[2]))
    return best


def _table1_verdict(s: dict[str, Any], batches: Sequence[int]) -> dict[str, str]:
    best = _table1_best(s, batches)
    wins, lines = 0, []
    for b in batches:
        tv = best["tvlars"][b][1]
        others = max(best["lars-warmup"][b][1], best["lamb-warmup"][b][1])
        wins += tv >= others
        lines.append(f"B={b}: TVLARS {100 * tv:.1f} vs best of LARS/LAMB {100 * others:.1f}")
    share = wins / len(batches)
    return {"claim": "TVLARS beats LARS and LAMB with warm-up (TVLARS Table 1)",
            "rule": "best setting per method and B (mean over seeds); reproduced if TVLARS is best in at least "
                    "two thirds of the batch sizes, partly if in at least one third",
            "evidence": "; ".join(lines) + f" (TVLARS best in {wins} of {len(batches)})",
            "verdict": _verdict(share >= 2 / 3, share >= 1 / 3)}


def verdicts(results: dict[str, Any], preset: Preset) -> list[dict[str, str]]:
    r"""One verdict per paper claim whose experiment was run, by the fixed rules written in each entry.

    Each verdict is a dict with ``claim``, ``rule``, ``evidence`` and
    ``verdict``: ``"reproduced"``, ``"partly reproduced"`` or
    ``"not reproduced"``. The claims are CLARS Figures 1–3 and TVLARS Table 1; for
    Figure 2 the statistic is
    :math:`\rho_k = \frac1n\sum_i\|g_{ik}\|^2 / \|\bar g_k\|^2`
    (see :func:`~lwrs.apps.train.loop.gradient_statistics`).

    Examples
    --------
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> verdicts({}, PRESETS["quick"])
    []
    """
    if preset.protocol >= 2:
        return _tuned_verdicts(results, preset)
    out = []
    if "fig1" in results:
        out.append(_fig1_verdict(results["fig1"]["summary"], preset.fig1_batches))
    if "fig2" in results:
        out.append(_fig2_verdict(results["fig2"]["variance_ratio"], early=min(3, preset.fig2_epochs)))
    if "fig3" in results:
        out.append(_fig3_verdict(results["fig3"]["summary"], preset.fig3_models, preset.fig3_window))
    if "table1" in results:
        out.append(_table1_verdict(results["table1"]["summary"], preset.table1_batches))
    return out


def _tuned_verdicts(results: dict[str, Any], preset: Preset) -> list[dict[str, str]]:
    """The verdicts of the tuned protocol: paired tests across seeds (:mod:`lwrs.apps.reproduce.rules`)."""
    from . import rules

    out = []
    if "fig1" in results:
        out += rules.fig1_verdicts(results["fig1"]["summary"], preset.fig1_batches, preset.budgets)
    if "fig2" in results:
        out.append(_fig2_verdict(results["fig2"]["variance_ratio"], early=min(3, preset.fig2_epochs)))
    if "fig3" in results:
        out.append(rules.fig3_verdict(results["fig3"]["summary"], preset.fig3_models,
                                      ("mnag-warmup", "mnag-freeze", "lars-warmup")))
    if "table1" in results:
        out += rules.table1_verdicts(results["table1"]["summary"], preset.table1_batches, ("epochs",),
                                     preset.table1_models)
    return out
