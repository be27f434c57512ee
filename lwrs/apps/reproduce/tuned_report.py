"""Tables and figures of the tuned protocol (``protocol`` 2): each method at the setting chosen on validation.

CLARS Figure 1 per budget, Figure 3 per model, TVLARS Table 1 per model and batch
size; every cell is the test accuracy mean ± std over seeds and the chosen rate.
"""

from __future__ import annotations

import statistics
from typing import Any

from .experiments import FIG3_METHODS, Preset

__all__ = ["tuned_tables", "tuned_plots", "at_grid_edge"]


def _cell(entry: dict[str, Any], selection: dict[str, Any], label: str, key: str = "by_seed") -> str:
    v = entry[label][key]
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    text = f"{100 * statistics.fmean(v):.1f} ± {100 * sd:.1f}"
    if label in selection:
        chosen = selection[label]["candidates"][selection[label]["chosen"]]
        text += f" (γ {chosen['learning_rate']:.3g}{EDGE if at_grid_edge(selection[label]) else ''})"
    return text


EDGE = "†"
EDGE_NOTE = "† the chosen rate is the smallest or largest of its grid: the best setting may lie outside it"


def at_grid_edge(selected: dict[str, Any]) -> bool:
    """Whether the chosen setting's rate is the smallest or the largest of a grid of several rates.

    Examples
    --------
    >>> grid = [{"learning_rate": r} for r in (0.1, 0.3, 1.0)]
    >>> at_grid_edge({"candidates": grid, "chosen": 0}), at_grid_edge({"candidates": grid, "chosen": 1})
    (True, False)
    """
    rates = [c["learning_rate"] for c in selected["candidates"]]
    chosen = rates[selected["chosen"]]
    return len(set(rates)) > 1 and chosen in (min(rates), max(rates))


def tuned_tables(results: dict[str, Any], preset: Preset) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` of Figures 1 and 3 and Table 1 under the tuned protocol.

    Examples
    --------
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> tuned_tables({}, PRESETS["quick"])
    []
    """
    tables = []
    if "fig1" in results:
        s, sel = results["fig1"]["summary"], results["fig1"].get("selection", {})
        for budget in preset.budgets:
            rows = [[str(b), _cell(s, sel, f"{budget}/mnag/B{b}"), _cell(s, sel, f"{budget}/lars/B{b}")]
                    for b in preset.fig1_batches]
            what = f"{preset.fig1_epochs} epochs" if budget == "epochs" else f"{preset.steps} steps"
            tables.append((f"Figure 1 analogue ({what}): final test accuracy (%), MLP, rates tuned on validation; "
                           f"{EDGE_NOTE}",
                           ["B", "mNAG", "LARS"], rows))
    if "fig3" in results:
        s, sel = results["fig3"]["summary"], results["fig3"].get("selection", {})
        rows = [[label, _cell(s, sel, label, "early_by_seed"), _cell(s, sel, label), str(s[label]["diverged"])]
                for label in s]
        tables.append(("Figure 3 analogue at B = 8192: mean test accuracy (%) over the first two warm-up windows, "
                       f"and final; {EDGE_NOTE}", ["model / method", "early", "final", "diverged"], rows))
    if "table1" in results:
        s, sel = results["table1"]["summary"], results["table1"].get("selection", {})
        methods = ("lars-warmup", "lamb-warmup", "tvlars")
        rows = [[f"{model} {b}"] + [_cell(s, sel, f"epochs/{model}/{m}/B{b}") for m in methods]
                for model in preset.table1_models for b in preset.table1_batches
                if f"epochs/{model}/tvlars/B{b}" in s]
        tables.append((f"TVLARS Table 1 analogue ({preset.table1_epochs} epochs): final test accuracy (%), "
                       f"settings tuned on validation; {EDGE_NOTE}", ["model, B", "LARS, warm-up", "LAMB, warm-up", "TVLARS"], rows))
    return tables


def tuned_plots(results: dict[str, Any], preset: Preset, plt, save) -> None:
    """Draw ``fig1.png`` (one panel per budget), ``fig3.png`` (one panel per model) and ``table1.png``."""
    if "fig1" in results:
        s = results["fig1"]["summary"]
        fig, axes = plt.subplots(1, len(preset.budgets), figsize=(5.2 * len(preset.budgets), 4), squeeze=False)
        for ax, budget in zip(axes[0], preset.budgets):
            for opt in ("mnag", "lars"):
                v = [s[f"{budget}/{opt}/B{b}"]["accuracy"] for b in preset.fig1_batches]
                ax.errorbar(preset.fig1_batches, [100 * m for m, _ in v], yerr=[100 * e for _, e in v], marker="o",
                            capsize=3, label=opt.upper())
            what = f"{preset.fig1_epochs} epochs" if budget == "epochs" else f"{preset.steps} steps"
            ax.set(xscale="log", xlabel="batch size B", ylabel="final test accuracy (%)", title=f"MLP, {what}")
            ax.set_xticks(preset.fig1_batches, [str(b) for b in preset.fig1_batches])
            ax.minorticks_off()
            ax.legend()
        save(fig, "fig1.png")
    if "fig3" in results:
        from .protocol import window_epochs

        s = results["fig3"]["summary"]
        fig, axes = plt.subplots(1, len(preset.fig3_models), figsize=(5.2 * len(preset.fig3_models), 4), squeeze=False)
        for ax, model in zip(axes[0], preset.fig3_models):
            for method in FIG3_METHODS:
                c = s[f"{model}/{method}"]["accuracy_curve"]
                ax.plot(range(len(c)), [100 * m for m, _ in c], label=method)
            ax.axvline(window_epochs(len(c) - 1), color="k", linestyle=":", linewidth=1)
            ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{model}, B = 8192")
        axes[0][-1].legend(fontsize=7)
        save(fig, "fig3.png")
    if "table1" in results:
        s = results["table1"]["summary"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for model in preset.table1_models:
            for m in ("lars-warmup", "lamb-warmup", "tvlars"):
                bs = [b for b in preset.table1_batches if f"epochs/{model}/{m}/B{b}" in s]
                v = [s[f"epochs/{model}/{m}/B{b}"]["accuracy"] for b in bs]
                ax.errorbar(bs, [100 * a for a, _ in v], yerr=[100 * e for _, e in v], marker="o", capsize=3,
                            label=f"{model}: {m}")
        ax.set(xscale="log", xlabel="batch size B", ylabel="final test accuracy (%)",
               title=f"TVLARS vs LARS/LAMB with warm-up, {preset.table1_epochs} epochs")
        ax.set_xticks(list(preset.table1_batches), [str(b) for b in preset.table1_batches])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        save(fig, "table1.png")
