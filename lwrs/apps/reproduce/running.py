r"""``lwrs reproduce``: the CLARS and TVLARS papers' experiments at small scale, on MNIST-1D.

Four experiments, each a list of :class:`~lwrs.apps.train.config.TrainConfig`
run for several seeds and reported as mean ± standard deviation:

``fig1``
    CLARS Figure 1: LARS against mNAG as the batch grows (MLP, linear scaling
    :math:`\gamma = 0.1\,B/128`, :math:`\eta = 10^{-3}`, as in the paper).
``fig2``
    CLARS Figure 2: the gradient-variance ratio per layer over the first epochs,
    for the 5-layer sigmoid FCN and CNN (mNAG, :math:`B = 128`), on all
    training samples after every epoch.
``fig3``
    CLARS Figure 3: warm-up, FC-layer freezing and CLARS in early training at
    :math:`B = 8192` (mNAG with :math:`\beta = 0.9`, :math:`\gamma = 1`; LARS
    and CLARS with :math:`\gamma = 0.1\,B/128`).
``table1``
    TVLARS Table 1: LARS and LAMB with warm-up (then cosine decay) against
    TVLARS, :math:`B \in \{512, \dots, 16384\}`, the paper's three learning
    rates per batch size, and TVLARS's :math:`\lambda` swept.

:func:`verdicts` turns the results into one verdict per paper claim:
*reproduced*, *partly reproduced* or *not reproduced* at this scale, with the
numbers behind it. The rules are fixed in code, before the runs.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..train.config import TrainConfig
from ..train.data import Dataset
from ..train.loop import train

__all__ = ["Preset", "PRESETS", "EXPERIMENTS", "TABLE1_LRS", "experiment_configs", "run_configs", "run_experiments",
           "summarize", "verdicts", "format_report", "plot_all", "render", "preset_of", "write_json", "default_jobs"]

EXPERIMENTS = ("fig1", "fig2", "fig3", "table1")

#: The TVLARS paper's target learning rates per batch size (section 6.1), used for LARS and TVLARS.
#: LAMB, whose step is not multiplied by eta = 1e-3, gets the same numbers times 1e-3.
TABLE1_LRS = {512: (1, 2, 3), 1024: (2, 3, 4), 2048: (5, 6, 7), 4096: (8, 9, 10), 8192: (10, 12, 15),
              16384: (15, 17, 19)}


@dataclasses.dataclass(frozen=True)
class Preset:
    """The sizes of a reproduction: seeds, epochs and the grids of each experiment."""

    seeds: int
    fig1_batches: tuple[int, ...]
    fig1_epochs: int
    fig2_epochs: int
    fig2_lrs: tuple[float, ...]
    fig3_models: tuple[str, ...]
    fig3_epochs: int
    fig3_window: int  # epochs of warm-up / FC freezing
    table1_batches: tuple[int, ...]
    table1_epochs: int
    table1_warmup: int
    table1_lambdas: tuple[float, ...]
    table1_lr_picks: tuple[int, ...]  # which of the paper's three learning rates to run


PRESETS = {
    "full": Preset(seeds=3, fig1_batches=(128, 256, 512, 1024, 2048, 4096, 8192), fig1_epochs=20,
                   fig2_epochs=10, fig2_lrs=(0.001, 0.3), fig3_models=("mlp", "cnn"), fig3_epochs=20,
                   fig3_window=4, table1_batches=tuple(TABLE1_LRS), table1_epochs=12, table1_warmup=2,
                   table1_lambdas=(0.1, 0.01, 0.001), table1_lr_picks=(0, 1, 2)),
    "quick": Preset(seeds=2, fig1_batches=(128, 2048), fig1_epochs=3, fig2_epochs=2, fig2_lrs=(0.3,),
                    fig3_models=("mlp",), fig3_epochs=4, fig3_window=1, table1_batches=(1024, 8192),
                    table1_epochs=4, table1_warmup=1, table1_lambdas=(0.01,), table1_lr_picks=(1,)),
}

FIG3_METHODS = ("mnag", "mnag-warmup", "mnag-freeze", "lars", "lars-warmup", "clars")


def _fig1(p: Preset) -> list[tuple[str, TrainConfig]]:
    return [(f"{opt}/B{b}", TrainConfig(model="mlp", optimizer=opt, batch_size=b, epochs=p.fig1_epochs,
                                        base_lr=0.1, base_batch=128, scaling="linear", stats_samples=0))
            for b in p.fig1_batches for opt in ("mnag", "lars")]


def _fig2(p: Preset) -> list[tuple[str, TrainConfig]]:
    return [(f"{model}/lr{lr:g}", TrainConfig(model=model, optimizer="mnag", batch_size=128, lr=lr,
                                               epochs=p.fig2_epochs, weight_decay=0.0, stats_samples=60_000))
            for model in ("fcn", "cnn") for lr in p.fig2_lrs]


def _fig3(p: Preset) -> list[tuple[str, TrainConfig]]:
    out = []
    for model in p.fig3_models:
        for method in FIG3_METHODS:
            lr = 1.0 if method.startswith("mnag") else None  # mNAG: the paper's 1.0; LARS/CLARS: 0.1 * B/128
            out.append((f"{model}/{method}", TrainConfig(
                model=model, optimizer=method, batch_size=8192, epochs=p.fig3_epochs, lr=lr, base_lr=0.1,
                warmup_epochs=p.fig3_window, freeze_epochs=p.fig3_window, stats_samples=0)))
    return out


def _table1(p: Preset) -> list[tuple[str, TrainConfig]]:
    out = []
    for b in p.table1_batches:
        common = dict(model="mlp", batch_size=b, epochs=p.table1_epochs, stats_samples=0)
        for i in p.table1_lr_picks:
            lr = float(TABLE1_LRS[b][i])
            out.append((f"lars-warmup/B{b}/lr{lr:g}", TrainConfig(
                optimizer="lars-warmup", lr=lr, warmup_epochs=p.table1_warmup, decay="cosine", **common)))
            out.append((f"lamb-warmup/B{b}/lr{lr:g}", TrainConfig(
                optimizer="lamb-warmup", lr=lr * 1e-3, warmup_epochs=p.table1_warmup, decay="cosine", **common)))
            for lam in p.table1_lambdas:
                out.append((f"tvlars/B{b}/lr{lr:g}/lambda{lam:g}", TrainConfig(
                    optimizer="tvlars", lr=lr, tvlars_lambda=lam, tvlars_delay_epochs=p.table1_warmup, **common)))
    return out


_BUILDERS: dict[str, Callable[[Preset], list[tuple[str, TrainConfig]]]] = {
    "fig1": _fig1, "fig2": _fig2, "fig3": _fig3, "table1": _table1}


def experiment_configs(name: str, preset: Preset) -> list[tuple[str, TrainConfig]]:
    """``(label, config)`` for every seed of experiment ``name``; the label has no seed in it.

    Examples
    --------
    >>> runs = experiment_configs("fig1", PRESETS["quick"])
    >>> len(runs), runs[0][0], runs[0][1].optimizer, runs[0][1].learning_rate()
    (8, 'mnag/B128', 'mnag', 0.1)
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return [(label, dataclasses.replace(cfg, seed=seed))
            for label, cfg in _BUILDERS[name](preset) for seed in range(preset.seeds)]


# ---- running ------------------------------------------------------------------------------------

_WORKER_DATA: Dataset | None = None


def _init_worker(data: Dataset, threads: int) -> None:
    global _WORKER_DATA
    import torch

    torch.set_num_threads(threads)
    _WORKER_DATA = data


def _run_one(config: TrainConfig) -> dict[str, Any]:
    assert _WORKER_DATA is not None
    return train(config, _WORKER_DATA)


def run_configs(configs: Sequence[TrainConfig], data: Dataset, *, jobs: int = 1,
                progress: Callable[[Iterable, int], Iterable] | None = None) -> list[dict[str, Any]]:
    """Train every config (in ``jobs`` worker processes, one torch thread each); results in input order.

    ``progress(items, total)`` may wrap the runs as they finish (e.g. a tqdm bar).

    Examples
    --------
    >>> from lwrs.apps.train.data import load_digits
    >>> recs = run_configs([TrainConfig(dataset="digits", batch_size=512, epochs=1, stats_samples=0)], load_digits())
    >>> len(recs), recs[0]["config"]["optimizer"]
    (1, 'lars')
    """
    if jobs <= 1:
        _init_worker(data, _torch_threads())
        items = progress(configs, len(configs)) if progress else configs
        return [_run_one(c) for c in items]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(data, 1)) as pool:
        pending = [pool.submit(_run_one, c) for c in configs]
        done = futures.as_completed(pending)
        for _ in (progress(done, len(pending)) if progress else done):
            pass
        return [f.result() for f in pending]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ---- summaries ------------------------------------------------------------------------------------

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _final_accuracy(record: dict[str, Any]) -> float:
    """The last epoch's test accuracy; a diverged run counts as chance level (1 / classes = 0.1)."""
    if record["diverged_epoch"] is not None:
        return 0.1
    return record["epochs"][-1]["test_accuracy"]


def summarize(labels: Sequence[str], records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Group runs by label: the seeds, mean ± std of the final accuracy and loss, curves and diverged counts.

    Examples
    --------
    >>> rec = lambda acc: {"diverged_epoch": None, "config": {"seed": 0},
    ...                    "epochs": [{"test_accuracy": acc, "train_loss": 1.0, "layers": {}}]}
    >>> s = summarize(["a", "a"], [rec(0.5), rec(0.7)])
    >>> round(s["a"]["accuracy"][0], 3), round(s["a"]["accuracy"][1], 3)
    (0.6, 0.141)
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for label, rec in zip(labels, records):
        groups.setdefault(label, []).append(rec)
    out = {}
    for label, recs in groups.items():
        epochs = len(recs[0]["epochs"])
        curve = [_mean_std([r["epochs"][e]["test_accuracy"] if r["diverged_epoch"] is None
                            or e < r["diverged_epoch"] else 0.1 for r in recs]) for e in range(epochs)]
        out[label] = {
            "seeds": len(recs),
            "accuracy": _mean_std([_final_accuracy(r) for r in recs]),
            "train_loss": _mean_std([r["epochs"][-1]["train_loss"] for r in recs]),
            "diverged": sum(r["diverged_epoch"] is not None for r in recs),
            "accuracy_curve": curve,
        }
    return out


def _variance_ratio_curves(labels: Sequence[str], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """For fig2: per label, the per-layer gradient-variance ratio per epoch, mean over seeds."""
    out: dict[str, Any] = {}
    for label in dict.fromkeys(labels):
        recs = [r for lab, r in zip(labels, records) if lab == label]
        layers = recs[0]["layers"]
        curves = []
        for e in range(len(recs[0]["epochs"])):
            per_seed = [r["epochs"][e]["layers"].get("variance_ratio") for r in recs]
            per_seed = [v for v in per_seed if v]
            curves.append([_mean_std([v[k] for v in per_seed])[0] for k in range(len(layers))] if per_seed else None)
        out[label] = {"layers": layers, "ratio": curves}
    return out


# ---- verdicts ---------------------------------------------------------------------------------------

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
    >>> verdicts({}, PRESETS["quick"])
    []
    """
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


# ---- report -----------------------------------------------------------------------------------------

def _pct(mean_std: Sequence[float]) -> str:
    m, s = mean_std
    return "—" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


def _tables(results: dict[str, Any], preset: Preset) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` for every experiment run, then the verdicts."""
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
        rows = [[method] + [f"{100 * m:.1f} ± {100 * sd:.1f} ({label.split('/', 2)[2]})" for label, m, sd in row.values()]
                for method, row in best.items()]
        tables.append(("TVLARS Table 1 analogue: best final test accuracy (%) over the swept settings, MLP",
                       ["method"] + [f"B={b}" for b in preset.table1_batches], rows))
    tables.append(("Verdicts", ["claim", "verdict", "evidence"],
                   [[v["claim"], f"**{v['verdict']}**", v["evidence"]] for v in results.get("verdicts", [])]))
    return tables


def format_report(results: dict[str, Any], preset: Preset, *, fmt: str = "markdown") -> str:
    """The tables of every experiment run, then the verdicts, as Markdown or reStructuredText.

    CLARS Figures 1–3 and TVLARS Table 1; ``fmt`` is ``"markdown"`` or ``"rst"``
    (``list-table`` directives, included by the docs' Results page).

    Examples
    --------
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
    >>> plot_all({}, PRESETS["quick"], pathlib.Path(tempfile.gettempdir()))
    []
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

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
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.6), squeeze=False)
        for ax, (label, c) in zip(axes[0], curves.items()):
            rows = [r for r in c["ratio"] if r]
            for k in range(len(c["layers"])):
                ax.plot(range(len(rows)), [r[k] for r in rows], marker=".", label=f"layer {k + 1}")
            ax.set(yscale="log", xlabel="epoch", title=label)
        axes[0][0].set_ylabel(r"$\frac{1}{n}\sum_i\|g_{ik}\|^2 / \|\bar g_k\|^2$")
        axes[0][-1].legend(fontsize=7)
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


def run_experiments(names: Sequence[str], preset: Preset, data: Dataset, *, jobs: int = 1,
                    progress: Callable[[str], Callable[[Iterable, int], Iterable] | None] | None = None
                    ) -> dict[str, Any]:
    """Run the named experiments; return ``{name: {"runs": [...], "summary": {...}}}`` plus ``"verdicts"``.

    ``progress(name)`` may return a wrapper for the runs of experiment ``name``
    (see :func:`run_configs`). The experiments are CLARS Figures 1–3 and TVLARS
    Table 1 at the sizes of ``preset``.

    Examples
    --------
    >>> run_experiments([], PRESETS["quick"], None)
    {'verdicts': []}
    """
    results: dict[str, Any] = {}
    for name in names:
        pairs = experiment_configs(name, preset)
        labels = [label for label, _ in pairs]
        records = run_configs([cfg for _, cfg in pairs], data, jobs=jobs,
                              progress=progress(name) if progress else None)
        entry: dict[str, Any] = {"summary": summarize(labels, records),
                                 "runs": [_compact(label, r) for label, r in zip(labels, records)]}
        if name == "fig2":
            entry["variance_ratio"] = _variance_ratio_curves(labels, records)
        results[name] = entry
    results["verdicts"] = verdicts(results, preset)
    return results


def _compact(label: str, record: dict[str, Any]) -> dict[str, Any]:
    """A run as stored: its config, the per-epoch losses and accuracies, and per-layer data where it matters."""
    keep_layers = record["config"]["stats_samples"] > 0 or record["config"]["optimizer"] == "clars"
    epochs = [{k: (_round(v) if k != "layers" else {n: [_round(x) for x in xs] for n, xs in v.items()})
               for k, v in e.items() if k != "layers" or keep_layers} for e in record["epochs"]]
    return {"label": label, "config": record["config"], "learning_rate": record["learning_rate"],
            "diverged_epoch": record["diverged_epoch"], "seconds": round(record["seconds"], 2), "epochs": epochs}


def _round(value: Any) -> Any:
    return float(f"{value:.5g}") if isinstance(value, float) and math.isfinite(value) else value


def default_jobs() -> int:
    """Worker processes for :func:`run_configs`: one per CPU core this process may use.

    Examples
    --------
    >>> default_jobs() >= 1
    True
    """
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def preset_of(record: dict[str, Any]) -> Preset:
    """The :class:`Preset` stored in a ``results.json`` record.

    Examples
    --------
    >>> import dataclasses
    >>> preset_of({"preset_values": dataclasses.asdict(PRESETS["quick"])}) == PRESETS["quick"]
    True
    """
    values = record["preset_values"]
    return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def render(record: dict[str, Any], folder) -> list[str]:
    """Write ``results.json``, ``report.md``, ``report.rst`` and the figures of a reproduction record.

    The record is what ``lwrs reproduce`` stores: the experiments' results
    (:func:`run_experiments`) plus ``command``, ``preset``, ``preset_values``,
    ``jobs``, ``seconds``, ``environment`` and ``dataset``. Rendering the
    same record twice gives the same reports (CLARS Figures 1–3, TVLARS Table 1).

    Examples
    --------
    >>> import pathlib, tempfile, dataclasses
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


def write_json(path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as strict JSON: tuples become lists, NaN and infinities become ``null``.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> write_json(path, {"a": (1.0, float("nan"))}); path.read_text().split()
    ['{', '"a":', '[', '1.0,', 'null', ']', '}']
    """
    path.write_text(json.dumps(_plain(payload), indent=1, allow_nan=False) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the command line: lwrs reproduce")
