"""Running the experiments of ``lwrs reproduce``: every config and seed, in worker processes, and their summaries.

The experiments are CLARS Figures 1–3 and TVLARS Table 1 (see :mod:`lwrs.apps.reproduce.experiments`).
"""

from __future__ import annotations

import concurrent.futures as futures
import math
import os
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..train.config import TrainConfig
from ..train.data import Dataset
from ..train.loop import train
from .experiments import Preset, experiment_configs
from .verdicts import verdicts

__all__ = ["run_configs", "run_experiments", "summarize", "add_early", "default_jobs"]


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
            "by_seed": [_final_accuracy(r) for r in sorted(recs, key=lambda r: r["config"]["seed"])],
        }
    return out


def add_early(summary: dict[str, dict[str, Any]], labels: Sequence[str], records: Sequence[dict[str, Any]]) -> None:
    """Add ``early_by_seed`` to each label of a Figure 3 summary: per seed, the mean test accuracy over the
    first two warm-up windows (a diverged epoch counts as chance, 0.1)."""
    from .protocol import window_epochs

    for label in summary:
        recs = sorted((r for lab, r in zip(labels, records) if lab == label), key=lambda r: r["config"]["seed"])
        w = window_epochs(len(recs[0]["epochs"]) - 1)
        summary[label]["early_by_seed"] = [
            statistics.fmean(e["test_accuracy"] if e["test_accuracy"] is not None else 0.1
                             for e in r["epochs"][1:2 * w + 1]) for r in recs]


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


def run_experiments(names: Sequence[str], preset: Preset, data: Dataset, *, jobs: int = 1,
                    progress: Callable[[str], Callable[[Iterable, int], Iterable] | None] | None = None
                    ) -> dict[str, Any]:
    """Run the named experiments; return ``{name: {"runs": [...], "summary": {...}}}`` plus ``"verdicts"``.

    ``progress(name)`` may return a wrapper for the runs of experiment ``name``
    (see :func:`run_configs`). The experiments are CLARS Figures 1–3 and TVLARS
    Table 1 at the sizes of ``preset``.

    Examples
    --------
    >>> from lwrs.apps.reproduce.experiments import PRESETS
    >>> run_experiments([], PRESETS["quick"], None)
    {'verdicts': []}
    """
    results: dict[str, Any] = {}
    for name in names:
        selection = None
        if preset.protocol >= 2:  # tuned: select on a validation split, then the seeds (lwrs.apps.reproduce.protocol)
            from .protocol import run_tuned

            labels, records, selection = run_tuned(
                name, preset, data, lambda cs, d, progress=None: run_configs(cs, d, jobs=jobs, progress=progress),
                progress=progress(name) if progress else None)
        else:
            pairs = experiment_configs(name, preset)
            labels = [label for label, _ in pairs]
            records = run_configs([cfg for _, cfg in pairs], data, jobs=jobs,
                                  progress=progress(name) if progress else None)
        entry: dict[str, Any] = {"summary": summarize(labels, records),
                                 "runs": [_compact(label, r) for label, r in zip(labels, records)]}
        if selection is not None:
            entry["selection"] = selection
            if name == "fig3":
                add_early(entry["summary"], labels, records)
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
