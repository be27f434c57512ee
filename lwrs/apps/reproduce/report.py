"""The reports of ``lwrs reproduce``: tables (Markdown and reStructuredText), figures and ``results.json``.

The analogues of CLARS Figures 1–3 and TVLARS Table 1, drawn from a results record
(so ``lwrs reproduce --from results.json`` draws them again without training).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ..records import write_json
from .experiments import FIG3_METHODS, Preset, preset_of
from .verdicts import _table1_best

__all__ = ["format_report", "plot_all", "render"]


_UNTUNED = Preset(**{f.name: None for f in dataclasses.fields(Preset) if f.default is dataclasses.MISSING})

_METHOD_NAMES = {"lars-warmup": "LARS, warm-up", "lamb-warmup": "LAMB, warm-up", "tvlars": "TVLARS"}


def _setting(label: str) -> str:
    """``"tvlars/B512/lr3/lambda0.001"`` -> ``"lr 3, λ 0.001"``: the swept setting of a Table 1 run."""
    parts = label.split("/")[2:]
    return ", ".join(p.replace("lambda", "λ ").replace("lr", "lr ") for p in parts)


def _pct(mean_std: Sequence[float]) -> str:
    m, s = mean_std
    return "—" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def _tables(results: dict[str, Any], preset: Preset) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` for every experiment run, then the verdicts."""
    if preset.protocol >= 2:
        from .tuned_report import tuned_tables

        tables = tuned_tables(results, preset)
        if "fig2" in results:
            tables[len(preset.budgets) if "fig1" in results else 0:0] = _tables({"fig2": results["fig2"]}, _UNTUNED)[:1]
        tables.append(("Verdicts", ["claim", "verdict", "evidence"],
                       [[v["claim"], f"**{v['verdict']}**", v["evidence"]] for v in results.get("verdicts", [])]))
        return tables
    tables = []
    if "fig1" in results:
        s = results["fig1"]["summary"]
        rows = [[str(b), _pct(s[f"mnag/B{b}"]["accuracy"]), _pct(s[f"lars/B{b}"]["accuracy"])]
                for b in preset.fig1_batches]
        tables.append(("Figure 1 analogue: final test accuracy (%), MLP", ["B", "mNAG", "LARS"], rows))
    if "fig2" in results:
        rows = []
        for label, c in results["fig2"]["variance_ratio"].items():
            last = len(c["ratio"]) - 1
            rows += [[label, str(e)] + [f"{v:.3g}" for v in c["ratio"][e]]
                     for e in sorted({0, 1, min(3, last), last}) if c["ratio"][e]]
        width = max((len(r) for r in rows), default=7) - 2
        tables.append(("Figure 2 analogue: gradient-variance ratio per layer (input side first), mean over seeds",
                       ["model / rate", "epoch"] + [f"layer {k + 1}" for k in range(width)], rows))
    if "fig3" in results:
        s = results["fig3"]["summary"]
        w = preset.fig3_window
        rows = [[label, _pct(v["accuracy_curve"][w]), _pct(v["accuracy_curve"][min(2 * w, len(v["accuracy_curve"]) - 1)]),
                 _pct(v["accuracy"]), str(v["diverged"])] for label, v in s.items()]
        tables.append((f"Figure 3 analogue: test accuracy (%) at B = 8192 after epochs {w} and {2 * w} and at the end",
                       ["model / method", f"epoch {w}", f"epoch {2 * w}", "final", "diverged"], rows))
    if "table1" in results:
        best = _table1_best(results["table1"]["summary"], preset.table1_batches)
        # one row per batch size, one column per method: as narrow as the page (six batch sizes as columns were not)
        rows = [[str(b)] + [f"{100 * best[method][b][1]:.1f} ± {100 * best[method][b][2]:.1f} "
                            f"({_setting(best[method][b][0])})" for method in best]
                for b in preset.table1_batches]
        tables.append(("TVLARS Table 1 analogue: best final test accuracy (%) over the swept settings, MLP",
                       ["B"] + [_METHOD_NAMES.get(method, method) for method in best], rows))
    tables.append(("Verdicts", ["claim", "verdict", "evidence"],
                   [[v["claim"], f"**{v['verdict']}**", v["evidence"]] for v in results.get("verdicts", [])]))
    return tables


def format_report(results: dict[str, Any], preset: Preset, *, fmt: str = "markdown") -> str:
    """The tables of every experiment run, then the verdicts, as Markdown or reStructuredText.

    CLARS Figures 1–3 and TVLARS Table 1; ``fmt`` is ``"markdown"`` or ``"rst"``
    (``list-table`` directives, included by the docs' Results page).

    Examples
    --------
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> print(format_report({"verdicts": []}, PRESETS["quick"]).splitlines()[0])
    ## Verdicts
    >>> print(format_report({"verdicts": []}, PRESETS["quick"], fmt="rst").splitlines()[0])
    .. list-table:: Verdicts
    """
    if fmt not in ("markdown", "rst"):
        raise ValueError(f'fmt must be "markdown" or "rst", got {fmt!r}')
    lines: list[str] = []
    for title, header, rows in _tables(results, preset):
        if fmt == "markdown":
            lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            lines += [f".. list-table:: {title}", "   :header-rows: 1", ""]
            for r in [header, *rows]:
                lines += [f"   * - {r[0]}"] + [f"     - {cell}" for cell in r[1:]]
        lines.append("")
    return "\n".join(lines)


def plot_all(results: dict[str, Any], preset: Preset, folder) -> list[str]:
    """Write ``fig1.png``, ``fig2.png``, ``fig3.png`` and ``table1.png`` for the experiments run; return their names.

    The analogues of CLARS Figures 1–3 and of TVLARS Table 1 (as a plot of the
    best accuracy per batch size).

    Examples
    --------
    >>> import pathlib, tempfile
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> plot_all({}, PRESETS["quick"], pathlib.Path(tempfile.gettempdir()))
    []
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        if not fig.get_constrained_layout():
            fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    if preset.protocol >= 2:
        from .tuned_report import tuned_plots

        tuned_plots({k: v for k, v in results.items() if k != "fig2"}, preset, plt, save)
        if "fig2" in results:
            plot_all({"fig2": results["fig2"]}, _UNTUNED, folder)
            written.insert(1 if "fig1" in results else 0, "fig2.png")
        return written

    if "fig1" in results:
        s = results["fig1"]["summary"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for opt in ("mnag", "lars"):
            m = [100 * s[f"{opt}/B{b}"]["accuracy"][0] for b in preset.fig1_batches]
            e = [100 * s[f"{opt}/B{b}"]["accuracy"][1] for b in preset.fig1_batches]
            ax.errorbar(preset.fig1_batches, m, yerr=e, marker="o", capsize=3, label=opt.upper())
        ax.set(xscale="log", xlabel="batch size B", ylabel="final test accuracy (%)",
               title=f"LARS vs mNAG, MLP, {preset.fig1_epochs} epochs")
        ax.set_xticks(preset.fig1_batches, [str(b) for b in preset.fig1_batches])
        ax.legend()
        save(fig, "fig1.png")
    if "fig2" in results:
        curves = results["fig2"]["variance_ratio"]
        # a grid of two columns (one model per row, one rate per column), each panel readable at page width
        columns = 2 if len(curves) > 1 else 1
        nrows = math.ceil(len(curves) / columns)
        fig, axes = plt.subplots(nrows, columns, figsize=(5.2 * columns, 3.6 * nrows + 0.7), squeeze=False,
                                 layout="constrained")
        for ax, (label, c) in zip(axes.flat, curves.items()):
            rows = [r for r in c["ratio"] if r]
            for k in range(len(c["layers"])):
                ax.plot(range(len(rows)), [r[k] for r in rows], marker=".", label=f"layer {k + 1}")
            model, _, rate = label.partition("/")
            ax.set_yscale("log")
            ax.set_title(f"{model.upper()}, rate {rate.removeprefix('lr')}", fontsize=12)
            ax.set_xlabel("epoch", fontsize=11)
            ax.set_ylabel(r"$\frac{1}{n}\sum_i\|g_{ik}\|^2 / \|\bar g_k\|^2$", fontsize=11)
            ax.tick_params(labelsize=10)
        for ax in list(axes.flat)[len(curves):]:
            ax.set_visible(False)
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, [f"{n} (input side)" if i == 0 else (f"{n} (head)" if i == len(names) - 1 else n)
                             for i, n in enumerate(names)],
                   loc="outside lower center", ncol=len(names), fontsize=10, frameon=False)
        save(fig, "fig2.png")
    if "fig3" in results:
        s = results["fig3"]["summary"]
        fig, axes = plt.subplots(1, len(preset.fig3_models), figsize=(5.5 * len(preset.fig3_models), 4),
                                 squeeze=False)
        for ax, model in zip(axes[0], preset.fig3_models):
            for method in FIG3_METHODS:
                c = s[f"{model}/{method}"]["accuracy_curve"]
                m = [100 * v[0] for v in c]
                sd = [100 * v[1] for v in c]
                ax.plot(range(len(c)), m, label=method)
                ax.fill_between(range(len(c)), [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                alpha=0.2)
            ax.axvline(preset.fig3_window, color="k", linestyle=":", linewidth=1)
            ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"{model}, B = 8192")
        axes[0][-1].legend(fontsize=7)
        save(fig, "fig3.png")
    if "table1" in results:
        best = _table1_best(results["table1"]["summary"], preset.table1_batches)
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for method, row in best.items():
            bs = list(row)
            ax.errorbar(bs, [100 * row[b][1] for b in bs], yerr=[100 * row[b][2] for b in bs], marker="o",
                        capsize=3, label=method)
        ax.set(xscale="log", xlabel="batch size B", ylabel="best final test accuracy (%)",
               title=f"TVLARS vs LARS/LAMB with warm-up, MLP, {preset.table1_epochs} epochs")
        ax.set_xticks(list(preset.table1_batches), [str(b) for b in preset.table1_batches])
        ax.legend()
        save(fig, "table1.png")
    return written


def render(record: dict[str, Any], folder) -> list[str]:
    """Write ``results.json``, ``report.md``, ``report.rst`` and the figures of a reproduction record.

    The record is what ``lwrs reproduce`` stores: the experiments' results
    (:func:`run_experiments`) plus ``command``, ``preset``, ``preset_values``,
    ``jobs``, ``seconds``, ``environment`` and ``dataset``. Rendering the
    same record twice gives the same reports (CLARS Figures 1–3, TVLARS Table 1).

    Examples
    --------
    >>> import pathlib, tempfile, dataclasses
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> rec = {"command": "lwrs reproduce --quick", "preset": "quick", "jobs": 1, "seconds": 1.0,
    ...        "preset_values": dataclasses.asdict(PRESETS["quick"]), "environment": {"machine": "cpu"},
    ...        "dataset": {"checksum": "0123456789abcdef"}, "verdicts": []}
    >>> render(rec, pathlib.Path(tempfile.mkdtemp()))
    ['results.json', 'report.md', 'report.rst']
    """
    import pathlib

    folder = pathlib.Path(folder)
    preset = preset_of(record)
    write_json(folder / "results.json", record)
    header = (f"# lwrs reproduce ({record['preset']})\n\n`{record['command']}` on "
              f"{record['environment']['machine']}, {record['jobs']} worker(s), {record['seconds']:.0f} s; "
              f"MNIST-1D checksum {record['dataset']['checksum'][:12]}.\n\n")
    (folder / "report.md").write_text(header + format_report(record, preset))
    (folder / "report.rst").write_text(format_report(record, preset, fmt="rst"))
    return ["results.json", "report.md", "report.rst", *plot_all(record, preset, folder)]
